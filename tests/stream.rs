//! The training data stream: global order, rank slices, resume, shuffle windows, errors,
//! shutdown, and (ignored by default) its throughput from local shards.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ditrun::data::stream::{
    measure_throughput, Batch, BatchStream, GlobalOrder, ObjectStoreShards, ShardSource,
    StreamOptions, StreamPosition,
};
use ditrun::data::{synthetic, Sample, ShardEntry, ShardIndex, ShardWriter};
use ditrun::{Error, Result};

const SIZE: usize = 2;
const CHANNELS: usize = 3;

/// Shards held in memory; a sample's label is its global id (shard by shard), so the order a
/// stream produces can be read off the labels.
struct MemoryShards {
    index: ShardIndex,
    shards: Vec<Vec<Sample>>,
    load_delay: Duration,
    loads: AtomicUsize,
}

fn pixels_of(id: usize) -> Vec<u8> {
    (0..SIZE * SIZE * CHANNELS)
        .map(|i| ((id * 7 + i * 31) % 256) as u8)
        .collect()
}

fn memory_shards(sizes: &[usize]) -> MemoryShards {
    let mut next_id = 0;
    let mut shards = Vec::new();
    let mut entries = Vec::new();
    for (shard, &size) in sizes.iter().enumerate() {
        let samples: Vec<Sample> = (next_id..next_id + size)
            .map(|id| Sample {
                key: format!("{id:06}"),
                pixels: pixels_of(id),
                caption: format!("sample {id}"),
                label: id as i64,
            })
            .collect();
        next_id += size;
        entries.push(ShardEntry {
            name: format!("shard-{shard:06}.tar"),
            samples: size,
            bytes: 0,
            sha256: String::new(),
        });
        shards.push(samples);
    }
    MemoryShards {
        index: ShardIndex {
            dataset: "memory".into(),
            image_size: SIZE,
            channels: CHANNELS,
            total_samples: next_id,
            captions: Vec::new(),
            shards: entries,
        },
        shards,
        load_delay: Duration::ZERO,
        loads: AtomicUsize::new(0),
    }
}

impl ShardSource for MemoryShards {
    fn index(&self) -> &ShardIndex {
        &self.index
    }

    fn load(&self, shard: usize) -> Result<Vec<Sample>> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(self.load_delay);
        Ok(self.shards[shard].clone())
    }
}

const SIZES: [usize; 7] = [10, 7, 13, 10, 0, 5, 12];

fn options(global_batch: usize, rank: usize, world_size: usize) -> StreamOptions {
    StreamOptions {
        seed: 17,
        global_batch,
        rank,
        world_size,
        shuffle_window: 2,
        prefetch_batches: 2,
        decode_threads: 2,
    }
}

fn take_batches(
    source: Arc<dyn ShardSource>,
    options: StreamOptions,
    start: StreamPosition,
    count: usize,
) -> Vec<Batch> {
    let mut stream = BatchStream::new(source, options, start).unwrap();
    (0..count).map(|_| stream.next_batch().unwrap()).collect()
}

fn labels(batches: &[Batch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| b.labels.iter().copied())
        .collect()
}

fn epoch_len() -> usize {
    SIZES.iter().sum()
}

#[test]
fn each_epoch_is_a_permutation_of_all_samples() {
    let n = epoch_len();
    let source = Arc::new(memory_shards(&SIZES));
    // 8 does not divide 57, so batches straddle the epoch ends.
    let batches = take_batches(
        source,
        options(8, 0, 1),
        StreamPosition::default(),
        3 * n / 8,
    );
    let order = labels(&batches);
    let all: Vec<i64> = (0..n as i64).collect();
    let mut epochs = Vec::new();
    for epoch in order.chunks_exact(n).take(2) {
        let mut sorted = epoch.to_vec();
        sorted.sort();
        assert_eq!(sorted, all);
        epochs.push(epoch.to_vec());
    }
    assert_ne!(epochs[0], epochs[1], "each epoch has its own order");
    assert_ne!(epochs[0], all, "the order is shuffled");

    for (k, batch) in batches.iter().enumerate() {
        let first = (k * 8) as u64;
        assert_eq!(batch.start, StreamPosition::from_global(first, n as u64));
        assert_eq!(batch.next, StreamPosition::from_global(first + 8, n as u64));
    }
    let straddling = &batches[7];
    assert_eq!(
        straddling.start,
        StreamPosition {
            epoch: 0,
            position: 56
        }
    );
    assert_eq!(
        straddling.next,
        StreamPosition {
            epoch: 1,
            position: 7
        }
    );
}

#[test]
fn the_stream_follows_the_global_order() {
    let source = Arc::new(memory_shards(&SIZES));
    let order = GlobalOrder::new(&source.index, 17, 2).unwrap();
    let expected: Vec<i64> = order
        .epoch_order(0)
        .iter()
        .map(|at| source.shards[at.shard as usize][at.index as usize].label)
        .collect();
    let batches = take_batches(source, options(3, 0, 1), StreamPosition::default(), 19);
    assert_eq!(labels(&batches), expected);
}

#[test]
fn same_seed_gives_the_same_order_and_another_seed_another() {
    let source: Arc<dyn ShardSource> = Arc::new(memory_shards(&SIZES));
    let run = |seed| {
        let options = StreamOptions {
            seed,
            ..options(8, 0, 1)
        };
        labels(&take_batches(
            source.clone(),
            options,
            StreamPosition::default(),
            8,
        ))
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn rank_slices_concatenate_to_the_single_rank_batches() {
    let source: Arc<dyn ShardSource> = Arc::new(memory_shards(&SIZES));
    let start = StreamPosition {
        epoch: 0,
        position: 3,
    };
    let single = take_batches(source.clone(), options(8, 0, 1), start, 20);
    for world_size in [2, 4] {
        let per_rank: Vec<Vec<Batch>> = (0..world_size)
            .map(|rank| take_batches(source.clone(), options(8, rank, world_size), start, 20))
            .collect();
        for (k, whole) in single.iter().enumerate() {
            let parts: Vec<&Batch> = per_rank.iter().map(|batches| &batches[k]).collect();
            let joined: Vec<i64> = parts.iter().flat_map(|b| b.labels.clone()).collect();
            assert_eq!(joined, whole.labels, "batch {k} on {world_size} ranks");
            let pixels: Vec<f32> = parts.iter().flat_map(|b| b.pixels.clone()).collect();
            assert_eq!(pixels, whole.pixels);
            for part in parts {
                assert_eq!(part.batch_size, 8 / world_size);
                assert_eq!((part.start, part.next), (whole.start, whole.next));
            }
        }
    }
}

#[test]
fn resuming_at_a_saved_position_reproduces_the_uninterrupted_batches() {
    let source: Arc<dyn ShardSource> = Arc::new(memory_shards(&SIZES));
    let uninterrupted = take_batches(
        source.clone(),
        options(8, 0, 1),
        StreamPosition::default(),
        16,
    );
    for stop_after in [1, 7, 9] {
        let saved = uninterrupted[stop_after - 1].next;
        let json = serde_json::to_string(&saved).unwrap();
        let restored: StreamPosition = serde_json::from_str(&json).unwrap();
        assert_eq!(
            restored,
            StreamPosition::default().advanced(8 * stop_after as u64, epoch_len() as u64)
        );
        let resumed = take_batches(source.clone(), options(8, 0, 1), restored, 16 - stop_after);
        assert_eq!(
            resumed,
            uninterrupted[stop_after..],
            "resumed after {stop_after} batches"
        );
    }
    // A resume on another world size sees the same global batches.
    let saved = uninterrupted[6].next;
    let halves: Vec<Vec<Batch>> = (0..2)
        .map(|rank| take_batches(source.clone(), options(8, rank, 2), saved, 4))
        .collect();
    for k in 0..4 {
        let joined = [halves[0][k].labels.clone(), halves[1][k].labels.clone()].concat();
        assert_eq!(joined, uninterrupted[7 + k].labels);
    }
}

#[test]
fn the_shuffle_window_bounds_how_far_samples_move() {
    let sizes = [10; 8];
    let source = memory_shards(&sizes);
    let shard_of = |id: i64| id / 10;
    for window in [1, 2, 3] {
        let order = GlobalOrder::new(&source.index, 3, window).unwrap();
        let ids: Vec<i64> = order
            .epoch_order(0)
            .iter()
            .map(|at| source.shards[at.shard as usize][at.index as usize].label)
            .collect();
        for chunk in ids.chunks(10 * window) {
            let shards: BTreeSet<i64> = chunk.iter().map(|&id| shard_of(id)).collect();
            assert_eq!(shards.len(), chunk.len() / 10, "window {window}: {chunk:?}");
        }
        assert_ne!(
            ids.iter().map(|&id| id % 10).collect::<Vec<_>>()[..10],
            (0..10).collect::<Vec<_>>()[..],
            "samples are shuffled inside the window"
        );
    }
    let global = GlobalOrder::new(&source.index, 3, 8)
        .unwrap()
        .epoch_order(0);
    let first_shards: BTreeSet<u32> = global[..10].iter().map(|at| at.shard).collect();
    assert!(
        first_shards.len() > 2,
        "a window over all shards mixes them: {first_shards:?}"
    );
}

#[test]
fn each_shard_is_loaded_once_per_window_and_only_when_the_rank_needs_it() {
    // Sixteen 8-sample shards, window 1, global batch 16 on 2 ranks: each rank's 8 samples
    // come from one shard, so each rank loads exactly half of the shards.
    let source = Arc::new(memory_shards(&[8; 16]));
    let mut per_rank_loads = Vec::new();
    for rank in 0..2 {
        let source = Arc::new(memory_shards(&[8; 16]));
        let options = StreamOptions {
            shuffle_window: 1,
            prefetch_batches: 0,
            ..options(16, rank, 2)
        };
        let batches = take_batches(source.clone(), options, StreamPosition::default(), 8);
        for batch in &batches {
            let shards: HashSet<i64> = batch.labels.iter().map(|id| id / 8).collect();
            assert_eq!(shards.len(), 1);
        }
        per_rank_loads.push(source.loads.load(Ordering::Relaxed));
    }
    // Without batch prefetch the assembler runs one batch (one window) ahead and asks for two
    // windows beyond that (one per loader), of which this rank needs at most two shards.
    for loads in &per_rank_loads {
        assert!(
            (8..=10).contains(loads),
            "loads per rank: {per_rank_loads:?}"
        );
    }
    // One epoch on a single rank with a window over everything loads each shard once.
    let options = StreamOptions {
        shuffle_window: 16,
        ..options(16, 0, 1)
    };
    take_batches(source.clone(), options, StreamPosition::default(), 8);
    assert_eq!(source.loads.load(Ordering::Relaxed), 16);
}

#[test]
fn pixels_are_channels_first_in_minus_one_to_one() {
    let source: Arc<dyn ShardSource> = Arc::new(memory_shards(&SIZES));
    let batch = &take_batches(source, options(4, 0, 1), StreamPosition::default(), 1)[0];
    assert_eq!(
        (batch.batch_size, batch.channels, batch.image_size),
        (4, CHANNELS, SIZE)
    );
    assert_eq!(batch.pixels.len(), 4 * CHANNELS * SIZE * SIZE);
    for (slot, &id) in batch.labels.iter().enumerate() {
        let raw = pixels_of(id as usize);
        assert_eq!(batch.captions[slot], format!("sample {id}"));
        for c in 0..CHANNELS {
            for p in 0..SIZE * SIZE {
                let got = batch.pixels[((slot * CHANNELS) + c) * SIZE * SIZE + p];
                let want = raw[p * CHANNELS + c] as f32 / 127.5 - 1.0;
                assert_eq!(got, want);
            }
        }
    }
    assert!(batch.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn impossible_options_name_the_option() {
    let source: Arc<dyn ShardSource> = Arc::new(memory_shards(&SIZES));
    let open = |options, start| {
        BatchStream::new(source.clone(), options, start)
            .err()
            .unwrap()
            .to_string()
    };
    let start = StreamPosition::default();
    let message = open(options(8, 0, 3), start);
    assert!(
        message.contains("world_size") && message.contains("global_batch 8"),
        "{message}"
    );
    let message = open(options(8, 2, 2), start);
    assert!(
        message.contains("`rank`") && message.contains("world_size 2"),
        "{message}"
    );
    let message = open(
        StreamOptions {
            shuffle_window: 0,
            ..options(8, 0, 1)
        },
        start,
    );
    assert!(message.contains("shuffle_window"), "{message}");
    let message = open(
        StreamOptions {
            decode_threads: 0,
            ..options(8, 0, 1)
        },
        start,
    );
    assert!(message.contains("decode_threads"), "{message}");
    let message = open(
        options(8, 0, 1),
        StreamPosition {
            epoch: 2,
            position: 57,
        },
    );
    assert!(
        message.contains("position: 57") && message.contains("57 samples"),
        "{message}"
    );

    let mut broken = memory_shards(&SIZES);
    broken.index.total_samples += 1;
    let message = BatchStream::new(Arc::new(broken), options(8, 0, 1), start)
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("total_samples") && message.contains("`memory`"),
        "{message}"
    );
}

/// A source whose shard 5 holds a sample with too few pixel bytes.
struct DamagedShard(MemoryShards);

impl ShardSource for DamagedShard {
    fn index(&self) -> &ShardIndex {
        self.0.index()
    }

    fn load(&self, shard: usize) -> Result<Vec<Sample>> {
        let mut samples = self.0.load(shard)?;
        if shard == 5 {
            samples[2].pixels.pop();
        }
        if shard == 6 {
            samples.pop();
        }
        Ok(samples)
    }
}

fn first_error(source: Arc<dyn ShardSource>) -> (Error, Result<Batch>) {
    let mut stream = BatchStream::new(source, options(8, 0, 1), StreamPosition::default()).unwrap();
    for _ in 0..100 {
        if let Err(error) = stream.next_batch() {
            return (error, stream.next_batch());
        }
    }
    panic!("no error in 100 batches");
}

#[test]
fn a_damaged_shard_surfaces_from_next_batch_with_its_name_and_key() {
    let (error, after) = first_error(Arc::new(DamagedShard(memory_shards(&SIZES))));
    let message = error.to_string();
    let sample_error = message.contains("shard-000005.tar")
        && message.contains("`000042`")
        && message.contains("11 pixel bytes, expected 12");
    let count_error = message.contains("shard-000006.tar") && message.contains("11 samples");
    assert!(sample_error || count_error, "{message}");
    let message = after.expect_err("the stream stays stopped").to_string();
    assert!(
        message.contains("stopped after an earlier error"),
        "{message}"
    );
}

#[test]
fn dropping_the_stream_mid_epoch_stops_its_threads() {
    let mut slow = memory_shards(&[50; 40]);
    slow.load_delay = Duration::from_millis(20);
    let source = Arc::new(slow);
    let options = StreamOptions {
        decode_threads: 3,
        prefetch_batches: 4,
        ..options(8, 0, 1)
    };
    let mut stream = BatchStream::new(source.clone(), options, StreamPosition::default()).unwrap();
    stream.next_batch().unwrap();
    assert!(
        stream.wait_time() >= Duration::from_millis(15),
        "{:?}",
        stream.wait_time()
    );
    let started = Instant::now();
    drop(stream);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Every thread held a clone of the source; all have been joined.
    assert_eq!(Arc::strong_count(&source), 1);
    assert!(source.loads.load(Ordering::Relaxed) < 40);
}

#[test]
fn positions_advance_over_epoch_ends() {
    let start = StreamPosition {
        epoch: 1,
        position: 50,
    };
    assert_eq!(start.global(57), 107);
    assert_eq!(
        start.advanced(8, 57),
        StreamPosition {
            epoch: 2,
            position: 1
        }
    );
    assert_eq!(
        start.advanced(57 * 3, 57),
        StreamPosition {
            epoch: 4,
            position: 50
        }
    );
}

fn write_synthetic_shards(dir: &std::path::Path, samples: usize, per_shard: usize) -> String {
    let prefix = dir.join("shards").to_str().unwrap().to_string();
    let mut writer = ShardWriter::new(&prefix, "synthetic", 32, 3, per_shard).unwrap();
    for sample in synthetic(samples, 32, 3, 7) {
        writer.write(sample).unwrap();
    }
    writer.finish().unwrap();
    prefix
}

#[test]
fn object_store_shards_stream_every_sample_once_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_synthetic_shards(dir.path(), 60, 16);
    let written: Vec<Sample> = synthetic(60, 32, 3, 7).collect();
    let source = Arc::new(ObjectStoreShards::open(&prefix).unwrap());
    assert_eq!(source.index().total_samples, 60);
    let batches = take_batches(source, options(12, 0, 1), StreamPosition::default(), 5);
    let mut streamed: Vec<(String, i64)> = batches
        .iter()
        .flat_map(|b| b.captions.iter().cloned().zip(b.labels.iter().copied()))
        .collect();
    let mut expected: Vec<(String, i64)> = written
        .iter()
        .map(|s| (s.caption.clone(), s.label))
        .collect();
    streamed.sort();
    expected.sort();
    assert_eq!(streamed, expected);
    assert_eq!(
        batches[4].next,
        StreamPosition {
            epoch: 1,
            position: 0
        }
    );
}

#[test]
fn a_corrupt_shard_file_surfaces_from_next_batch_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_synthetic_shards(dir.path(), 40, 10);
    let source = ObjectStoreShards::open(&prefix).unwrap();
    let name = source.index().shards[2].name.clone();
    let path = std::path::Path::new(&prefix).join(&name);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (error, _) = first_error(Arc::new(source));
    assert!(error.to_string().contains(&name), "{error}");
}

#[test]
#[ignore = "benchmark: cargo test --test stream -- --ignored --nocapture stream_throughput_local"]
fn stream_throughput_local() {
    let dir = tempfile::tempdir().unwrap();
    let samples = 20_480;
    let started = Instant::now();
    let prefix = write_synthetic_shards(dir.path(), samples, 1024);
    println!("wrote {samples} samples in {:.1?}", started.elapsed());
    let source: Arc<dyn ShardSource> = Arc::new(ObjectStoreShards::open(&prefix).unwrap());
    let options = StreamOptions {
        seed: 0,
        global_batch: 256,
        rank: 0,
        world_size: 1,
        shuffle_window: 4,
        prefetch_batches: 4,
        decode_threads: 1,
    };
    let batches = samples / 256;
    let cpu_before = common::process_cpu_seconds();
    let started = Instant::now();
    let images_per_s = measure_throughput(source, options, batches).unwrap();
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(common::process_cpu_seconds())
        .map(|(a, b)| b - a);
    println!(
        "stream_throughput_local: {images_per_s:.0} images/s (decode_threads = 1, 32x32x3, \
         {batches} batches of 256, {wall:.2} s wall)"
    );
    if let Some(cpu) = cpu {
        println!(
            "  process CPU {cpu:.2} s -> {:.0} images per CPU-second",
            (batches * 256) as f64 / cpu
        );
    }
}
