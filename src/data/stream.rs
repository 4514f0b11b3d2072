//! The training data stream: a global sample order that depends only on (seed, epoch, shard
//! index), this rank's slice of every global batch, shard loading and batch assembly on
//! background threads, and a resume point of two integers.
//!
//! # Order
//! Epoch `e` shuffles the shards with `(seed, e)`, cuts the shuffled list into windows of
//! `shuffle_window` consecutive shards, and shuffles the samples inside each window with
//! `(seed, e, window)`. A sample therefore never moves outside its window, which is what lets
//! a rank hold only a few shards in memory. Positions form one global counter over the endless
//! concatenation of epochs (`epoch * epoch_len + position`), so a global batch that reaches the
//! end of an epoch simply continues with the first samples of the next one.
//!
//! # Batches and ranks
//! The `k`-th batch of a stream started at global position `s` covers `[s + kG, s + (k+1)G)`;
//! rank `r` of `W` takes the contiguous slice `[rG/W, (r+1)G/W)` of it. Nothing in the order
//! depends on `W` or `r`, so a job resumed on another world size (same global batch) sees the
//! same samples in the same global batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::data::shards::{read_index_at, read_shard_at, Sample, ShardIndex};
use crate::error::{Error, Result};
use crate::storage::Location;

/// Where shards come from: the index and one shard's decoded samples at a time.
/// `load` errors should name the shard (and the sample key where one is at fault).
pub trait ShardSource: Send + Sync {
    fn index(&self) -> &ShardIndex;
    fn load(&self, shard: usize) -> Result<Vec<Sample>>;
}

/// Shards written by `ShardWriter` under an object-store URL (or a local path).
pub struct ObjectStoreShards {
    prefix: Location,
    index: ShardIndex,
}

impl ObjectStoreShards {
    pub fn open(prefix_url: &str) -> Result<Self> {
        Self::at(Location::parse(prefix_url)?)
    }

    /// The shards under a prefix already parsed; reads and checks `index.json`.
    pub fn at(prefix: Location) -> Result<Self> {
        let index = read_index_at(&prefix)?;
        Ok(Self { prefix, index })
    }

    /// The prefix's canonical URL.
    pub fn prefix(&self) -> &str {
        self.prefix.url()
    }
}

impl ShardSource for ObjectStoreShards {
    fn index(&self) -> &ShardIndex {
        &self.index
    }

    fn load(&self, shard: usize) -> Result<Vec<Sample>> {
        read_shard_at(&self.prefix, &self.index, shard)
    }
}

/// A resume point: the next sample to read is `position` of `epoch`'s order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    pub epoch: u64,
    pub position: u64,
}

impl StreamPosition {
    /// The position on the global counter over all epochs.
    pub fn global(self, epoch_len: u64) -> u64 {
        self.epoch * epoch_len + self.position
    }

    pub fn from_global(global: u64, epoch_len: u64) -> Self {
        Self {
            epoch: global / epoch_len,
            position: global % epoch_len,
        }
    }

    /// The position `samples` global samples later (e.g. `n * global_batch` after n batches).
    pub fn advanced(self, samples: u64, epoch_len: u64) -> Self {
        Self::from_global(self.global(epoch_len) + samples, epoch_len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    pub seed: u64,
    /// Samples per optimiser step over all ranks.
    pub global_batch: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Consecutive shards (of the epoch's shard order) whose samples are shuffled together.
    pub shuffle_window: usize,
    /// Assembled batches kept ready ahead of the training step (0: assemble on demand).
    pub prefetch_batches: usize,
    /// Threads reading and decoding shards.
    pub decode_threads: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            global_batch: 64,
            rank: 0,
            world_size: 1,
            shuffle_window: 4,
            prefetch_batches: 4,
            decode_threads: 1,
        }
    }
}

impl StreamOptions {
    /// Samples this rank receives per batch.
    pub fn local_batch(&self) -> usize {
        self.global_batch / self.world_size.max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("global_batch", self.global_batch),
            ("world_size", self.world_size),
            ("shuffle_window", self.shuffle_window),
            ("decode_threads", self.decode_threads),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(option_error(field, "must be at least 1, found 0".into()));
            }
        }
        if !self.global_batch.is_multiple_of(self.world_size) {
            return Err(option_error(
                "world_size",
                format!(
                    "{} ranks do not divide global_batch {}; every rank needs the same number \
                     of samples per step",
                    self.world_size, self.global_batch
                ),
            ));
        }
        if self.rank >= self.world_size {
            return Err(option_error(
                "rank",
                format!(
                    "rank {} is outside world_size {} (expected 0..{})",
                    self.rank, self.world_size, self.world_size
                ),
            ));
        }
        Ok(())
    }
}

fn option_error(field: &str, reason: String) -> Error {
    Error::Stream {
        what: format!("option `{field}`"),
        reason,
    }
}

/// This rank's part of one global batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[batch_size, channels, image_size, image_size]`, scaled from 0..=255 to [-1, 1].
    pub pixels: Vec<f32>,
    pub captions: Vec<String>,
    pub labels: Vec<i64>,
    pub batch_size: usize,
    pub channels: usize,
    pub image_size: usize,
    /// Position of the global batch's first sample (the same on every rank).
    pub start: StreamPosition,
    /// Where to resume after this batch (the same on every rank).
    pub next: StreamPosition,
}

/// A reference to one sample: shard number in the index and index inside that shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleRef {
    pub shard: u32,
    pub index: u32,
}

/// SplitMix64 with Lemire's unbiased bounded integers. The order is spelled out here rather
/// than taken from `rand` because saved stream positions must keep pointing at the same
/// samples across dependency upgrades, and `rand` does not promise value stability.
struct OrderRng(u64);

impl OrderRng {
    fn new(seed: u64, stream: &[u64]) -> Self {
        let mut state = mix64(seed);
        for &word in stream {
            state = mix64(state ^ mix64(word.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        }
        Self(state)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut product = u128::from(self.next_u64()) * u128::from(n);
        if (product as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (product as u64) < threshold {
                product = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (product >> 64) as u64
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Domain words keep the shard shuffle and the window shuffles on unrelated random streams.
const SHARD_ORDER_STREAM: u64 = 1;
const WINDOW_ORDER_STREAM: u64 = 2;

/// One epoch's shard order and the first position of each window in it.
struct EpochLayout {
    shards: Vec<u32>,
    window_starts: Vec<u64>,
}

/// The global order: a pure function of (seed, epoch, shard sizes, shuffle window).
#[derive(Clone, Debug)]
pub struct GlobalOrder {
    shard_sizes: Vec<u64>,
    epoch_len: u64,
    seed: u64,
    shuffle_window: usize,
}

impl GlobalOrder {
    pub fn new(index: &ShardIndex, seed: u64, shuffle_window: usize) -> Result<Self> {
        if shuffle_window == 0 {
            return Err(option_error(
                "shuffle_window",
                "must be at least 1, found 0".into(),
            ));
        }
        let shard_sizes: Vec<u64> = index.shards.iter().map(|s| s.samples as u64).collect();
        let epoch_len: u64 = shard_sizes.iter().sum();
        let index_error = |reason: String| Error::Stream {
            what: format!("shard index of dataset `{}`", index.dataset),
            reason,
        };
        if epoch_len != index.total_samples as u64 {
            return Err(index_error(format!(
                "total_samples is {} but the shards list {} samples",
                index.total_samples, epoch_len
            )));
        }
        if epoch_len == 0 {
            return Err(index_error(
                "holds no samples; expected at least one".into(),
            ));
        }
        if index.shards.len() > u32::MAX as usize
            || shard_sizes.iter().any(|&n| n > u64::from(u32::MAX))
        {
            return Err(index_error(
                "more than 2^32 shards or samples in one shard".into(),
            ));
        }
        Ok(Self {
            shard_sizes,
            epoch_len,
            seed,
            shuffle_window,
        })
    }

    pub fn epoch_len(&self) -> u64 {
        self.epoch_len
    }

    pub fn windows_per_epoch(&self) -> u64 {
        self.shard_sizes.len().div_ceil(self.shuffle_window) as u64
    }

    fn layout(&self, epoch: u64) -> EpochLayout {
        let mut shards: Vec<u32> = (0..self.shard_sizes.len() as u32).collect();
        OrderRng::new(self.seed, &[SHARD_ORDER_STREAM, epoch]).shuffle(&mut shards);
        let mut window_starts = vec![0];
        let mut position = 0;
        for window in shards.chunks(self.shuffle_window) {
            position += window
                .iter()
                .map(|&s| self.shard_sizes[s as usize])
                .sum::<u64>();
            window_starts.push(position);
        }
        EpochLayout {
            shards,
            window_starts,
        }
    }

    fn window_order(&self, epoch: u64, layout: &EpochLayout, window: u64) -> Vec<SampleRef> {
        let first = window as usize * self.shuffle_window;
        let last = (first + self.shuffle_window).min(layout.shards.len());
        let mut samples: Vec<SampleRef> = layout.shards[first..last]
            .iter()
            .flat_map(|&shard| {
                (0..self.shard_sizes[shard as usize] as u32)
                    .map(move |index| SampleRef { shard, index })
            })
            .collect();
        OrderRng::new(self.seed, &[WINDOW_ORDER_STREAM, epoch, window]).shuffle(&mut samples);
        samples
    }

    /// The whole order of one epoch (for inspection and tests; the stream works window by window).
    pub fn epoch_order(&self, epoch: u64) -> Vec<SampleRef> {
        let layout = self.layout(epoch);
        (0..self.windows_per_epoch())
            .flat_map(|window| self.window_order(epoch, &layout, window))
            .collect()
    }
}

/// Answers "which sample is at global position g" with the current epochs' layouts and the
/// windows in use cached, so that each is computed once.
struct OrderCursor {
    order: GlobalOrder,
    layouts: HashMap<u64, EpochLayout>,
    windows: HashMap<u64, Vec<SampleRef>>,
}

impl OrderCursor {
    fn new(order: GlobalOrder) -> Self {
        Self {
            order,
            layouts: HashMap::new(),
            windows: HashMap::new(),
        }
    }

    fn layout(&mut self, epoch: u64) -> &EpochLayout {
        let order = &self.order;
        self.layouts
            .entry(epoch)
            .or_insert_with(|| order.layout(epoch))
    }

    /// Window sequence number (counting windows over all epochs) of a global position.
    fn window_of(&mut self, global: u64) -> u64 {
        let epoch = global / self.order.epoch_len;
        let position = global % self.order.epoch_len;
        let starts = &self.layout(epoch).window_starts;
        let window = starts.partition_point(|&start| start <= position) - 1;
        epoch * self.order.windows_per_epoch() + window as u64
    }

    /// Global positions `[first, end)` covered by a window.
    fn window_range(&mut self, window_seq: u64) -> (u64, u64) {
        let per_epoch = self.order.windows_per_epoch();
        let (epoch, window) = (window_seq / per_epoch, (window_seq % per_epoch) as usize);
        let epoch_start = epoch * self.order.epoch_len;
        let starts = &self.layout(epoch).window_starts;
        (
            epoch_start + starts[window],
            epoch_start + starts[window + 1],
        )
    }

    fn window(&mut self, window_seq: u64) -> &[SampleRef] {
        if !self.windows.contains_key(&window_seq) {
            let per_epoch = self.order.windows_per_epoch();
            let epoch = window_seq / per_epoch;
            self.layout(epoch);
            let samples =
                self.order
                    .window_order(epoch, &self.layouts[&epoch], window_seq % per_epoch);
            self.windows.insert(window_seq, samples);
        }
        &self.windows[&window_seq]
    }

    fn sample_at(&mut self, global: u64) -> SampleRef {
        let window_seq = self.window_of(global);
        let (first, _) = self.window_range(window_seq);
        self.window(window_seq)[(global - first) as usize]
    }

    fn forget_before(&mut self, window_seq: u64) {
        let per_epoch = self.order.windows_per_epoch();
        self.windows.retain(|&seq, _| seq >= window_seq);
        self.layouts
            .retain(|&epoch, _| epoch >= window_seq / per_epoch);
    }
}

/// Batches of this rank's slice of the global order, assembled ahead on background threads.
/// Dropping it stops and joins the threads.
pub struct BatchStream {
    batches: Option<Receiver<Result<Batch>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    waited: Duration,
    epoch_len: u64,
}

impl BatchStream {
    pub fn new(
        source: Arc<dyn ShardSource>,
        options: StreamOptions,
        start: StreamPosition,
    ) -> Result<Self> {
        options.validate()?;
        let order = GlobalOrder::new(source.index(), options.seed, options.shuffle_window)?;
        let epoch_len = order.epoch_len();
        if start.position >= epoch_len {
            return Err(Error::Stream {
                what: format!("start position {start:?}"),
                reason: format!(
                    "position is past the end of an epoch of {epoch_len} samples (dataset `{}`); \
                     was it saved for another dataset?",
                    source.index().dataset
                ),
            });
        }
        tracing::debug!(
            dataset = %source.index().dataset,
            epoch = start.epoch,
            position = start.position,
            ?options,
            "starting data stream"
        );

        let stop = Arc::new(AtomicBool::new(false));
        let (request_tx, request_rx) = unbounded::<u32>();
        let (loaded_tx, loaded_rx) = unbounded();
        let mut threads = Vec::with_capacity(options.decode_threads + 1);
        for worker in 0..options.decode_threads {
            let (source, requests, loaded, stop) = (
                source.clone(),
                request_rx.clone(),
                loaded_tx.clone(),
                stop.clone(),
            );
            threads.push(spawn_named(format!("stream-load-{worker}"), move || {
                load_shards(&*source, &requests, &loaded, &stop)
            })?);
        }
        // The assembler must not hold a sender of loaded shards: when the loaders stop, it
        // has to see the channel close instead of waiting for a shard that never comes.
        drop(loaded_tx);

        let (batch_tx, batch_rx) = bounded(options.prefetch_batches);
        let assembler = Assembler::new(
            source,
            order,
            options,
            start.global(epoch_len),
            request_tx,
            loaded_rx,
        );
        let assembler_stop = stop.clone();
        threads.push(spawn_named("stream-assemble".into(), move || {
            assembler.run(&batch_tx, &assembler_stop)
        })?);

        Ok(Self {
            batches: Some(batch_rx),
            threads,
            stop,
            waited: Duration::ZERO,
            epoch_len,
        })
    }

    /// The next batch; after an error the stream has stopped and every later call errs too.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let batches = self.batches.as_ref().expect("receiver lives until drop");
        let started = Instant::now();
        let received = batches.recv();
        self.waited += started.elapsed();
        received.unwrap_or_else(|_| {
            Err(Error::Stream {
                what: "batch stream".into(),
                reason: "stopped after an earlier error; reopen it at the last batch's `next` \
                         position"
                    .into(),
            })
        })
    }

    /// Total time `next_batch` spent waiting for data.
    pub fn wait_time(&self) -> Duration {
        self.waited
    }

    /// Samples in one epoch of the underlying dataset.
    pub fn epoch_len(&self) -> u64 {
        self.epoch_len
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the batch channel wakes an assembler blocked on a full queue.
        self.batches.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn_named(name: String, work: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(work)
        .map_err(|source| Error::io(format!("<thread {name}>"), source))
}

type LoadedShard = (u32, Result<Arc<Vec<Sample>>>);

fn load_shards(
    source: &dyn ShardSource,
    requests: &Receiver<u32>,
    loaded: &Sender<LoadedShard>,
    stop: &AtomicBool,
) {
    for shard in requests.iter() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let started = Instant::now();
        let samples = load_checked(source, shard as usize).map(Arc::new);
        tracing::trace!(shard, elapsed = ?started.elapsed(), "loaded shard");
        if loaded.send((shard, samples)).is_err() {
            return;
        }
    }
}

/// Loads a shard and checks it against the index, so that a mismatch is reported with the
/// shard's name here rather than as an index panic during assembly.
fn load_checked(source: &dyn ShardSource, shard: usize) -> Result<Vec<Sample>> {
    let index = source.index();
    let entry = &index.shards[shard];
    let samples = source.load(shard)?;
    if samples.len() != entry.samples {
        return Err(Error::Shard {
            shard: entry.name.clone(),
            reason: format!(
                "holds {} samples but the index lists {}",
                samples.len(),
                entry.samples
            ),
        });
    }
    let expected = index.image_size * index.image_size * index.channels;
    if let Some(bad) = samples.iter().find(|s| s.pixels.len() != expected) {
        return Err(Error::ShardSample {
            shard: entry.name.clone(),
            key: bad.key.clone(),
            reason: format!(
                "{} pixel bytes, expected {expected} ({size}x{size}x{channels})",
                bad.pixels.len(),
                size = index.image_size,
                channels = index.channels
            ),
        });
    }
    Ok(samples)
}

/// A shard held for assembly: `None` while it is loading. `last_window` is the last window
/// sequence number known to need it; the shard is dropped once assembly has moved past that.
struct HeldShard {
    samples: Option<Arc<Vec<Sample>>>,
    last_window: u64,
}

/// Walks the batches, asks the loaders for the shards this rank needs a few windows ahead,
/// and turns samples into f32 batches.
struct Assembler {
    source: Arc<dyn ShardSource>,
    cursor: OrderCursor,
    options: StreamOptions,
    /// Global position where the stream started; batch k begins at `origin + k * G`.
    origin: u64,
    next_global: u64,
    held: HashMap<u32, HeldShard>,
    planned_through: Option<u64>,
    windows_ahead: u64,
    requests: Sender<u32>,
    loaded: Receiver<LoadedShard>,
    to_unit: [f32; 256],
}

impl Assembler {
    fn new(
        source: Arc<dyn ShardSource>,
        order: GlobalOrder,
        options: StreamOptions,
        origin: u64,
        requests: Sender<u32>,
        loaded: Receiver<LoadedShard>,
    ) -> Self {
        // Enough windows queued that every loader has a shard to work on.
        let windows_ahead = options
            .decode_threads
            .div_ceil(options.shuffle_window)
            .max(1) as u64;
        Self {
            source,
            cursor: OrderCursor::new(order),
            options,
            origin,
            next_global: origin,
            held: HashMap::new(),
            planned_through: None,
            windows_ahead,
            requests,
            loaded,
            to_unit: std::array::from_fn(|v| v as f32 / 127.5 - 1.0),
        }
    }

    fn run(mut self, batches: &Sender<Result<Batch>>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let batch = self.next_batch();
            let failed = batch.is_err();
            if batches.send(batch).is_err() || failed {
                return;
            }
        }
    }

    fn local_range(&self) -> (u64, u64) {
        let local = self.options.local_batch() as u64;
        let first = self.next_global + self.options.rank as u64 * local;
        (first, first + local)
    }

    fn next_batch(&mut self) -> Result<Batch> {
        let (first, end) = self.local_range();
        let first_window = self.cursor.window_of(first);
        let last_window = self.cursor.window_of(end - 1);
        self.held.retain(|_, held| held.last_window >= first_window);
        self.cursor.forget_before(first_window);
        self.plan_through(last_window + self.windows_ahead);

        let index = self.source.index();
        let (size, channels) = (index.image_size, index.channels);
        let sample_len = size * size * channels;
        let count = (end - first) as usize;
        let mut pixels = vec![0.0f32; count * sample_len];
        let mut captions = Vec::with_capacity(count);
        let mut labels = Vec::with_capacity(count);
        for (slot, global) in (first..end).enumerate() {
            let at = self.cursor.sample_at(global);
            let shard = self.ready_shard(at.shard)?;
            let sample = &shard[at.index as usize];
            self.write_channels_first(
                &sample.pixels,
                channels,
                &mut pixels[slot * sample_len..(slot + 1) * sample_len],
            );
            captions.push(sample.caption.clone());
            labels.push(sample.label);
        }

        let epoch_len = self.cursor.order.epoch_len;
        let global_start = self.next_global;
        self.next_global += self.options.global_batch as u64;
        Ok(Batch {
            pixels,
            captions,
            labels,
            batch_size: count,
            channels,
            image_size: size,
            start: StreamPosition::from_global(global_start, epoch_len),
            next: StreamPosition::from_global(self.next_global, epoch_len),
        })
    }

    /// HWC bytes to CHW floats in [-1, 1].
    /// RGB gets its own loop: this runs for every pixel of every image, and the crate builds at
    /// opt-level 1 in tests, where the generic strided loop costs about a third of a core.
    fn write_channels_first(&self, pixels: &[u8], channels: usize, out: &mut [f32]) {
        let lut = &self.to_unit;
        let plane = out.len() / channels;
        if channels == 3 {
            let (red, rest) = out.split_at_mut(plane);
            let (green, blue) = rest.split_at_mut(plane);
            let planes = red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut());
            for (rgb, ((r, g), b)) in pixels.chunks_exact(3).zip(planes) {
                *r = lut[rgb[0] as usize];
                *g = lut[rgb[1] as usize];
                *b = lut[rgb[2] as usize];
            }
            return;
        }
        for (channel, out_plane) in out.chunks_exact_mut(plane).enumerate() {
            let values = pixels[channel..].iter().step_by(channels);
            for (dst, &src) in out_plane.iter_mut().zip(values) {
                *dst = lut[src as usize];
            }
        }
    }

    /// Requests the shards of every window up to `last_window` that this rank reads from.
    fn plan_through(&mut self, last_window: u64) {
        let next = self
            .planned_through
            .map_or_else(|| self.cursor.window_of(self.origin), |w| w + 1);
        for window_seq in next..=last_window {
            for shard in self.shards_needed(window_seq) {
                self.hold(shard, window_seq);
            }
            self.planned_through = Some(window_seq);
        }
    }

    fn hold(&mut self, shard: u32, window_seq: u64) {
        match self.held.get_mut(&shard) {
            Some(held) => held.last_window = held.last_window.max(window_seq),
            None => {
                self.held.insert(
                    shard,
                    HeldShard {
                        samples: None,
                        last_window: window_seq,
                    },
                );
                // The loaders only stop after the assembler has gone, so this cannot fail
                // while anyone waits for the shard.
                let _ = self.requests.send(shard);
            }
        }
    }

    /// Shards of one window that hold samples of this rank's slices, in order of first use.
    fn shards_needed(&mut self, window_seq: u64) -> Vec<u32> {
        let (window_first, window_end) = self.cursor.window_range(window_seq);
        let global_batch = self.options.global_batch as u64;
        let local = self.options.local_batch() as u64;
        let rank_offset = self.options.rank as u64 * local;
        let begin = window_first.max(self.origin);
        let mut needed = Vec::new();
        if begin >= window_end {
            return needed;
        }
        let first_batch = (begin - self.origin) / global_batch;
        let last_batch = (window_end - 1 - self.origin) / global_batch;
        let samples = self.cursor.window(window_seq);
        for batch in first_batch..=last_batch {
            let slice_first = self.origin + batch * global_batch + rank_offset;
            let from = slice_first.max(begin);
            let to = (slice_first + local).min(window_end);
            for global in from..to {
                let shard = samples[(global - window_first) as usize].shard;
                if !needed.contains(&shard) {
                    needed.push(shard);
                }
            }
        }
        needed
    }

    /// Waits until a requested shard has arrived from the loaders.
    fn ready_shard(&mut self, shard: u32) -> Result<Arc<Vec<Sample>>> {
        loop {
            match self.held.get(&shard) {
                Some(HeldShard {
                    samples: Some(samples),
                    ..
                }) => return Ok(samples.clone()),
                Some(_) => {}
                None => {
                    let window = self.planned_through.unwrap_or(0);
                    self.hold(shard, window);
                }
            }
            let (arrived, samples) = self.loaded.recv().map_err(|_| Error::Stream {
                what: "shard loaders".into(),
                reason: "stopped before delivering a shard".into(),
            })?;
            let samples = samples?;
            if let Some(held) = self.held.get_mut(&arrived) {
                held.samples = Some(samples);
            }
        }
    }
}

/// Images per second that a stream decodes and batches, from opening it to the last batch.
pub fn measure_throughput(
    source: Arc<dyn ShardSource>,
    options: StreamOptions,
    batches: usize,
) -> Result<f64> {
    let started = Instant::now();
    let mut stream = BatchStream::new(source, options, StreamPosition::default())?;
    let mut images = 0usize;
    for _ in 0..batches {
        images += stream.next_batch()?.batch_size;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(stream);
    Ok(images as f64 / elapsed)
}
