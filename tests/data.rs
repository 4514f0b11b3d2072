//! Datasets and caption shards: round trips through file://, plain paths and memory://, every
//! damaged-input case with the message it must give, CIFAR-10 archives generated here and
//! served from a local HTTP server, and Fashion-MNIST IDX files.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use common::{idx_images, idx_labels};
use ditrun::data::cifar10::{self, ArchiveSpec, CIFAR10_CLASSES};
use ditrun::data::fashion_mnist::{self, FASHION_MNIST_CLASSES};
use ditrun::data::shards::sample_key;
use ditrun::data::synthetic::{
    colour_and_shape, BACKGROUND_MAX, COLOURS, COLOUR_JITTER, GRAY_JITTER, SHAPES,
};
use ditrun::data::{
    prepare, prepare_with, read_index, read_shard, synthetic, synthetic_captions, DatasetKind,
    PrepareOptions, Sample, ShardIndex, ShardWriter, Split,
};
use ditrun::storage::location_url;
use md5::{Digest, Md5};
use sha2::Sha256;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn read_all(prefix: &str) -> (ShardIndex, Vec<Sample>) {
    let index = read_index(prefix).expect("read index.json");
    let samples = (0..index.shards.len())
        .flat_map(|shard| read_shard(prefix, &index, shard).expect("read shard"))
        .collect();
    (index, samples)
}

fn write_shards(
    prefix: &str,
    samples: &[Sample],
    size: usize,
    channels: usize,
    per_shard: usize,
) -> ShardIndex {
    let mut writer = ShardWriter::new(prefix, "test", size, channels, per_shard).unwrap();
    for sample in samples {
        writer.write(sample.clone()).unwrap();
    }
    writer.finish().unwrap()
}

fn error_text<T: std::fmt::Debug>(result: ditrun::Result<T>) -> String {
    let message = result.expect_err("expected an error").to_string();
    // Visible with --nocapture, to read what users would see.
    eprintln!("error: {message}");
    message
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// Writes an index.json by hand, as a damaged or hand-edited dataset would have it.
fn write_index_json(dir: &Path, index: &ShardIndex) {
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(index).unwrap(),
    )
    .unwrap();
}

/// Rebuilds one shard with `edit` applied to each member (None drops it), and records the new
/// size and sha256 in index.json, so that only the edit itself can be what the reader rejects.
fn rewrite_shard(dir: &Path, shard: usize, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let mut index: ShardIndex =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let path = dir.join(&index.shards[shard].name);
    let original = fs::read(&path).unwrap();
    let mut archive = tar::Archive::new(Cursor::new(original));
    let mut builder = tar::Builder::new(Vec::new());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if let Some(data) = edit(&name, data) {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, &name, data.as_slice())
                .unwrap();
        }
    }
    let bytes = builder.into_inner().unwrap();
    index.shards[shard].bytes = bytes.len() as u64;
    index.shards[shard].sha256 = sha256_hex(&bytes);
    fs::write(&path, &bytes).unwrap();
    write_index_json(dir, &index);
}

/// A folder with 7 synthetic 8×8 RGB samples in shards of 3 (3 + 3 + 1).
fn small_dataset() -> (tempfile::TempDir, ShardIndex) {
    let dir = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = synthetic(7, 8, 3, 11).collect();
    let index = write_shards(dir.path().to_str().unwrap(), &samples, 8, 3, 3);
    (dir, index)
}

fn prefix_of(dir: &tempfile::TempDir) -> String {
    dir.path().to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// shards: round trips and index
// ---------------------------------------------------------------------------------------------

#[test]
fn synthetic_shards_round_trip_through_a_file_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path())
        .unwrap()
        .to_string();
    let index = prepare(
        DatasetKind::Synthetic,
        &url,
        None,
        Split::Train,
        Some(25),
        10,
        Some(16),
        7,
    )
    .unwrap();

    let expected: Vec<Sample> = synthetic(25, 16, 3, 7).collect();
    let (read_back_index, samples) = read_all(&url);
    assert_eq!(read_back_index, index);
    assert_eq!(samples, expected);

    assert_eq!(index.dataset, "synthetic/train");
    assert_eq!(
        (index.image_size, index.channels, index.total_samples),
        (16, 3, 25)
    );
    let counts: Vec<usize> = index.shards.iter().map(|s| s.samples).collect();
    assert_eq!(counts, [10, 10, 5]);
    let distinct: BTreeSet<String> = expected.iter().map(|s| s.caption.clone()).collect();
    assert_eq!(index.captions, distinct.into_iter().collect::<Vec<_>>());
    for (number, shard) in index.shards.iter().enumerate() {
        assert_eq!(shard.name, format!("shard-{number:06}.tar"));
        let bytes = fs::read(dir.path().join(&shard.name)).unwrap();
        assert_eq!(shard.bytes, bytes.len() as u64);
        assert_eq!(shard.sha256, sha256_hex(&bytes));
    }
    let keys: Vec<String> = samples.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys, (0..25).map(sample_key).collect::<Vec<_>>());
}

#[test]
fn shards_round_trip_through_memory_and_a_plain_path() {
    let samples: Vec<Sample> = synthetic(9, 12, 1, 3).collect();
    let memory = "memory://data-tests/round-trip";
    let index = write_shards(memory, &samples, 12, 1, 4);
    assert_eq!(read_all(memory), (index, samples.clone()));

    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    let index = write_shards(nested.to_str().unwrap(), &samples, 12, 1, 4);
    assert_eq!(
        read_all(nested.to_str().unwrap()),
        (index.clone(), samples.clone())
    );
    // The plain path and its file:// URL name the same dataset.
    let url = location_url(nested.to_str().unwrap()).unwrap();
    assert!(url.starts_with("file:///"), "{url}");
    assert_eq!(read_all(&url), (index, samples));
}

#[test]
fn shards_are_webdataset_members_and_identical_for_identical_samples() {
    let (dir, index) = small_dataset();
    let bytes = fs::read(dir.path().join("shard-000000.tar")).unwrap();
    let mut archive = tar::Archive::new(Cursor::new(bytes));
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    let expected: Vec<String> = (0..3)
        .flat_map(|i| ["png", "txt", "cls"].map(|ext| format!("{}.{ext}", sample_key(i))))
        .collect();
    assert_eq!(names, expected);

    let again = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = synthetic(7, 8, 3, 11).collect();
    let index_again = write_shards(again.path().to_str().unwrap(), &samples, 8, 3, 3);
    assert_eq!(index_again, index);
}

#[test]
fn index_is_written_last_and_a_new_prepare_hides_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix_of(&dir);
    let mut writer = ShardWriter::new(&prefix, "test", 8, 3, 2).unwrap();
    for sample in synthetic(5, 8, 3, 1) {
        writer.write(sample).unwrap();
    }
    assert!(dir.path().join("shard-000001.tar").is_file());
    let message = error_text(read_index(&prefix));
    assert!(
        message.contains("index.json") && message.contains("not found"),
        "{message}"
    );
    let index = writer.finish().unwrap();
    assert_eq!(read_index(&prefix).unwrap(), index);

    // Starting over at the same prefix must not leave the old index pointing at shards that
    // are about to be overwritten.
    let _rewrite = ShardWriter::new(&prefix, "test", 8, 3, 2).unwrap();
    let message = error_text(read_index(&prefix));
    assert!(message.contains("not found"), "{message}");
}

#[test]
fn writer_rejects_bad_samples_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = ShardWriter::new(&prefix_of(&dir), "test", 8, 3, 2).unwrap();
    let mut samples = synthetic(2, 8, 3, 1);
    let mut short = samples.next().unwrap();
    short.pixels.truncate(10);
    let message = error_text(writer.write(short));
    assert!(
        message.contains("00000000") && message.contains("192"),
        "{message}"
    );

    let good = samples.next().unwrap();
    writer.write(good.clone()).unwrap();
    let message = error_text(writer.write(good));
    assert!(
        message.contains("00000001") && message.contains("increase"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// shards: damaged input
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_index_names_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(read_index(&prefix_of(&dir)));
    assert!(
        message.contains(&format!("{}/index.json", dir.path().display())),
        "{message}"
    );
    assert!(message.contains("not found"), "{message}");
}

#[test]
fn bad_index_fields_are_named() {
    let (dir, index) = small_dataset();
    let prefix = prefix_of(&dir);
    let raw: serde_json::Value = serde_json::to_value(&index).unwrap();
    type Damage = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Damage)> = vec![
        ("image_size", Box::new(|v| v["image_size"] = "big".into())),
        (
            "captions",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("captions");
            }),
        ),
        ("total_samples", Box::new(|v| v["total_samples"] = 8.into())),
        ("channels", Box::new(|v| v["channels"] = 5.into())),
        (
            "shards[1].name",
            Box::new(|v| v["shards"][1]["name"] = "../escape.tar".into()),
        ),
        (
            "shards[0].sha256",
            Box::new(|v| v["shards"][0]["sha256"] = "abc".into()),
        ),
        (
            "shards[2].bytes",
            Box::new(|v| v["shards"][2]["bytes"] = (-1).into()),
        ),
    ];
    for (field, damage) in cases {
        let mut value = raw.clone();
        damage(&mut value);
        fs::write(
            dir.path().join("index.json"),
            serde_json::to_vec(&value).unwrap(),
        )
        .unwrap();
        let message = error_text(read_index(&prefix));
        assert!(
            message.contains(&format!("`{field}`")),
            "{field}: {message}"
        );
        assert!(message.contains("index.json"), "{field}: {message}");
    }
    fs::write(dir.path().join("index.json"), b"{ not json").unwrap();
    let message = error_text(read_index(&prefix));
    assert!(
        message.contains("not valid JSON") && message.contains("index.json"),
        "{message}"
    );
}

#[test]
fn missing_shard_is_named() {
    let (dir, index) = small_dataset();
    fs::remove_file(dir.path().join("shard-000001.tar")).unwrap();
    assert!(read_shard(&prefix_of(&dir), &index, 0).is_ok());
    let message = error_text(read_shard(&prefix_of(&dir), &index, 1));
    assert!(
        message.contains("shard-000001.tar") && message.contains("missing"),
        "{message}"
    );
    let message = error_text(read_shard(&prefix_of(&dir), &index, 3));
    assert!(
        message.contains("#3") && message.contains("3 shards"),
        "{message}"
    );
}

#[test]
fn truncated_shard_is_named_with_both_sizes() {
    let (dir, index) = small_dataset();
    let path = dir.path().join("shard-000002.tar");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 700]).unwrap();
    let message = error_text(read_shard(&prefix_of(&dir), &index, 2));
    assert!(message.contains("shard-000002.tar"), "{message}");
    assert!(
        message.contains(&bytes.len().to_string())
            && message.contains(&(bytes.len() - 700).to_string()),
        "{message}"
    );
    assert!(message.contains("truncated"), "{message}");
}

#[test]
fn shard_with_a_different_sha256_is_named() {
    let (dir, index) = small_dataset();
    let path = dir.path().join("shard-000000.tar");
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&path, &bytes).unwrap();
    let message = error_text(read_shard(&prefix_of(&dir), &index, 0));
    assert!(
        message.contains("shard-000000.tar") && message.contains("sha256"),
        "{message}"
    );
    assert!(
        message.contains(&index.shards[0].sha256) && message.contains(&sha256_hex(&bytes)),
        "{message}"
    );
}

#[test]
fn corrupt_png_names_shard_and_key() {
    let (dir, _) = small_dataset();
    rewrite_shard(dir.path(), 1, |name, mut data| {
        if name == "00000004.png" {
            let middle = data.len() / 2;
            for byte in &mut data[middle..middle + 8] {
                *byte ^= 0xA5;
            }
        }
        Some(data)
    });
    let index = read_index(&prefix_of(&dir)).unwrap();
    let message = error_text(read_shard(&prefix_of(&dir), &index, 1));
    assert!(
        message.contains("shard-000001.tar") && message.contains("`00000004`"),
        "{message}"
    );
    assert!(message.contains("corrupt PNG"), "{message}");
}

#[test]
fn missing_caption_or_label_member_names_shard_and_key() {
    for (dropped, extension) in [
        ("00000001.txt", ".txt"),
        ("00000002.cls", ".cls"),
        ("00000000.png", ".png"),
    ] {
        let (dir, _) = small_dataset();
        rewrite_shard(dir.path(), 0, |name, data| {
            (name != dropped).then_some(data)
        });
        let index = read_index(&prefix_of(&dir)).unwrap();
        let message = error_text(read_shard(&prefix_of(&dir), &index, 0));
        let key = &dropped[..8];
        assert!(
            message.contains("shard-000000.tar") && message.contains(&format!("`{key}`")),
            "{message}"
        );
        assert!(message.contains(extension), "{message}");
    }
}

#[test]
fn unreadable_label_names_shard_and_key() {
    let (dir, _) = small_dataset();
    rewrite_shard(dir.path(), 0, |name, data| {
        Some(if name == "00000002.cls" {
            b"seven".to_vec()
        } else {
            data
        })
    });
    let index = read_index(&prefix_of(&dir)).unwrap();
    let message = error_text(read_shard(&prefix_of(&dir), &index, 0));
    assert!(
        message.contains("`00000002`") && message.contains("seven"),
        "{message}"
    );
}

#[test]
fn image_of_the_wrong_size_or_channels_names_shard_and_key() {
    let (dir, index) = small_dataset();
    let mut wrong = index.clone();
    wrong.image_size = 32;
    write_index_json(dir.path(), &wrong);
    let message = error_text(read_shard(&prefix_of(&dir), &wrong, 0));
    assert!(
        message.contains("shard-000000.tar") && message.contains("`00000000`"),
        "{message}"
    );
    assert!(
        message.contains("8×8×3") && message.contains("32×32×3"),
        "{message}"
    );

    let mut wrong = index;
    wrong.channels = 1;
    write_index_json(dir.path(), &wrong);
    let message = error_text(read_shard(&prefix_of(&dir), &wrong, 0));
    assert!(
        message.contains("8×8×3") && message.contains("8×8×1"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// synthetic
// ---------------------------------------------------------------------------------------------

#[test]
fn synthetic_is_deterministic_and_seeded() {
    let a: Vec<Sample> = synthetic(12, 16, 3, 5).collect();
    assert_eq!(a, synthetic(12, 16, 3, 5).collect::<Vec<_>>());
    let b: Vec<Sample> = synthetic(12, 16, 3, 6).collect();
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| x.pixels != y.pixels && x.caption == y.caption));
    assert!(synthetic_captions().len() >= 12);
}

/// The caption must be readable from the pixels: the shape's colour is the caption's colour,
/// and how much of its bounding box it fills tells square (≈1), circle (≈π/4), triangle (≈½).
#[test]
fn synthetic_captions_match_what_is_drawn() {
    for sample in synthetic(48, 32, 3, 42) {
        let label = sample.label as usize;
        let (colour, shape) = colour_and_shape(label);
        let (colour_name, rgb, _) = COLOURS[colour];
        assert_eq!(
            sample.caption,
            format!("a photo of a {colour_name} {}", SHAPES[shape])
        );
        let close = |p: &[u8]| {
            p.iter()
                .zip(rgb)
                .all(|(&v, c)| (v as i32 - c as i32).abs() <= COLOUR_JITTER as i32)
        };
        let mut mask = Vec::new();
        for (i, pixel) in sample.pixels.chunks_exact(3).enumerate() {
            if close(pixel) {
                mask.push((i % 32, i / 32));
            } else {
                assert!(
                    pixel.iter().all(|&v| v <= BACKGROUND_MAX),
                    "{}: stray pixel {pixel:?}",
                    sample.caption
                );
            }
        }
        assert!(
            mask.len() >= 30,
            "{}: only {} shape pixels",
            sample.caption,
            mask.len()
        );
        let (xs, ys): (Vec<usize>, Vec<usize>) = mask.iter().copied().unzip();
        let width = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
        let height = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
        let fill = mask.len() as f64 / (width * height) as f64;
        let seen = if fill > 0.92 {
            "square"
        } else if fill > 0.63 {
            "circle"
        } else {
            "triangle"
        };
        assert_eq!(seen, SHAPES[shape], "{}: fill {fill:.2}", sample.caption);
    }
}

/// The reader that scores generated samples (`ditrun inspect shapes`) reads every real sample's
/// colour and shape right, including ones with noise added, and sees nothing in background.
#[test]
fn recognise_reads_the_colour_and_shape_of_real_samples() {
    use ditrun::data::synthetic::recognise;
    let mut rng = 12345u64;
    let mut noise = move || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) % 31) as i16 - 15
    };
    for sample in synthetic(240, 32, 3, 42) {
        let (colour, shape) = colour_and_shape(sample.label as usize);
        let seen = recognise(&sample.pixels, 32);
        assert_eq!(
            (seen.colour, seen.shape),
            (Some(colour), Some(shape)),
            "{}",
            sample.caption
        );
        let noisy: Vec<u8> = sample
            .pixels
            .iter()
            .map(|&v| (v as i16 + noise()).clamp(0, 255) as u8)
            .collect();
        let seen = recognise(&noisy, 32);
        assert_eq!(
            (seen.colour, seen.shape),
            (Some(colour), Some(shape)),
            "{} with noise",
            sample.caption
        );
    }
    let background = vec![60u8; 32 * 32 * 3];
    assert_eq!(recognise(&background, 32).shape, None);
}

/// In one channel, every shape pixel lies in its colour's own band of gray levels.
#[test]
fn synthetic_grayscale_tells_colours_apart() {
    let bands: Vec<(u8, u8)> = COLOURS
        .iter()
        .map(|&(_, _, gray)| (gray - GRAY_JITTER, gray + GRAY_JITTER))
        .collect();
    assert!(bands.windows(2).all(|pair| pair[0].1 < pair[1].0) && bands[0].0 > BACKGROUND_MAX);
    let mut seen_colours = BTreeSet::new();
    for sample in synthetic(24, 16, 1, 9) {
        assert_eq!(sample.pixels.len(), 16 * 16);
        let (colour, _) = colour_and_shape(sample.label as usize);
        let (low, high) = bands[colour];
        let shape: Vec<u8> = sample
            .pixels
            .iter()
            .copied()
            .filter(|&p| p > BACKGROUND_MAX)
            .collect();
        assert!(shape.len() >= 12, "{}", sample.caption);
        assert!(
            shape.iter().all(|&p| (low..=high).contains(&p)),
            "{}: {shape:?}",
            sample.caption
        );
        seen_colours.insert(colour);
    }
    assert_eq!(seen_colours.len(), COLOURS.len());
}

// ---------------------------------------------------------------------------------------------
// CIFAR-10
// ---------------------------------------------------------------------------------------------

/// A small archive in the official format: records of the batches and the archive bytes.
struct FakeCifar {
    batches: Vec<(String, Vec<u8>)>,
    archive: Vec<u8>,
}

fn fake_cifar(records_per_batch: usize) -> FakeCifar {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next_byte = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    };
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    let batches: Vec<(String, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(b, name)| {
            let mut data = Vec::new();
            for r in 0..records_per_batch {
                data.push(((b * 3 + r) % 10) as u8);
                data.extend((0..3072).map(|_| next_byte()));
            }
            (name.to_string(), data)
        })
        .collect();
    let mut tar = tar::Builder::new(Vec::new());
    let mut members: Vec<(String, Vec<u8>)> = batches
        .iter()
        .map(|(n, d)| (format!("cifar-10-batches-bin/{n}"), d.clone()))
        .collect();
    let meta = CIFAR10_CLASSES.join("\n") + "\n\n";
    members.insert(
        0,
        (
            "cifar-10-batches-bin/batches.meta.txt".into(),
            meta.into_bytes(),
        ),
    );
    // Not in the order the reader wants them, which must not matter.
    members.swap(1, 4);
    for (name, data) in &members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    FakeCifar {
        batches,
        archive: gz.finish().unwrap(),
    }
}

/// What the reader must produce, computed straight from the planar records.
fn expected_cifar(fake: &FakeCifar, split: Split) -> Vec<Sample> {
    let wanted: &[&str] = match split {
        Split::Train => &[
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        Split::Test => &["test_batch.bin"],
    };
    let articles = ["an", "an", "a", "a", "a", "a", "a", "a", "a", "a"];
    let mut samples = Vec::new();
    for name in wanted {
        let data = &fake.batches.iter().find(|(n, _)| n == name).unwrap().1;
        for record in data.chunks_exact(3073) {
            let label = record[0] as usize;
            let mut pixels = vec![0u8; 3072];
            for y in 0..32 {
                for x in 0..32 {
                    for c in 0..3 {
                        pixels[(y * 32 + x) * 3 + c] = record[1 + c * 1024 + y * 32 + x];
                    }
                }
            }
            samples.push(Sample {
                key: sample_key(samples.len()),
                pixels,
                caption: format!("a photo of {} {}", articles[label], CIFAR10_CLASSES[label]),
                label: label as i64,
            });
        }
    }
    samples
}

/// A one-file HTTP server on 127.0.0.1 that counts its requests.
struct FileServer {
    url: String,
    requests: Arc<AtomicUsize>,
}

fn serve_file(name: &str, body: Vec<u8>) -> FileServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/{name}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let (counter, path) = (requests.clone(), format!("/{name}"));
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = answer(stream, &path, &body);
        }
    });
    FileServer { url, requests }
}

fn answer(mut stream: TcpStream, path: &str, body: &[u8]) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let requested = request_line.split_whitespace().nth(1).unwrap_or("");
    if requested == path {
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body)?;
    } else {
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
    }
    stream.flush()
}

fn cifar_options(out: &str, spec: ArchiveSpec, cache: &Path) -> PrepareOptions {
    PrepareOptions {
        archive: spec,
        cache_dir: cache.to_path_buf(),
        samples_per_shard: 4,
        ..PrepareOptions::new(DatasetKind::Cifar10, out)
    }
}

#[test]
fn cifar10_captions_are_the_seeds() {
    let captions = cifar10::cifar10_captions();
    assert_eq!(
        &captions[..3],
        [
            "a photo of an airplane",
            "a photo of an automobile",
            "a photo of a bird"
        ]
    );
    let tail: Vec<String> = ["cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        .iter()
        .map(|c| format!("a photo of a {c}"))
        .collect();
    assert_eq!(&captions[3..], tail.as_slice());
}

#[test]
fn cifar10_is_downloaded_verified_cached_and_read() {
    let fake = fake_cifar(3);
    let server = serve_file("cifar-10-binary.tar.gz", fake.archive.clone());
    let cache = tempfile::tempdir().unwrap();
    let spec = ArchiveSpec {
        url: server.url.clone(),
        md5: md5_hex(&fake.archive),
        bytes: Some(fake.archive.len() as u64),
    };
    let out = "memory://data-tests/cifar-train";
    let index = prepare_with(&cifar_options(out, spec.clone(), cache.path())).unwrap();
    let (_, samples) = read_all(out);
    assert_eq!(samples, expected_cifar(&fake, Split::Train));
    assert_eq!(
        (index.image_size, index.channels, index.total_samples),
        (32, 3, 15)
    );
    assert_eq!(index.dataset, "cifar10/train");
    let distinct: BTreeSet<String> = samples.iter().map(|s| s.caption.clone()).collect();
    assert_eq!(index.captions, distinct.into_iter().collect::<Vec<_>>());

    // The lock that lets ranks on one node take turns stays, as for cached weights.
    let cached: Vec<PathBuf> = fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|ext| ext != "lock"))
        .collect();
    assert_eq!(
        cached,
        [cache.path().join("cifar-10-binary.tar.gz")],
        "no .part may remain"
    );
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);

    // The test split comes from the cached copy.
    let out = "memory://data-tests/cifar-test";
    let options = PrepareOptions {
        split: Split::Test,
        ..cifar_options(out, spec, cache.path())
    };
    prepare_with(&options).unwrap();
    assert_eq!(read_all(out).1, expected_cifar(&fake, Split::Test));
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn cifar10_from_a_local_archive_and_a_sample_limit() {
    let fake = fake_cifar(2);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("my-cifar.tar.gz");
    fs::write(&archive, &fake.archive).unwrap();
    let spec = ArchiveSpec {
        url: "http://127.0.0.1:9/never-used".into(),
        md5: md5_hex(&fake.archive),
        bytes: None,
    };
    let out = "memory://data-tests/cifar-local";
    let options = PrepareOptions {
        source: Some(archive.to_str().unwrap().to_string()),
        samples: Some(7),
        ..cifar_options(out, spec, dir.path())
    };
    let index = prepare_with(&options).unwrap();
    assert_eq!(index.total_samples, 7);
    assert_eq!(
        read_all(out).1,
        expected_cifar(&fake, Split::Train)[..7].to_vec()
    );
}

#[test]
fn cifar10_with_the_wrong_md5_is_refused_and_nothing_is_kept_or_deleted() {
    let fake = fake_cifar(1);
    let found = md5_hex(&fake.archive);
    let wrong = "0123456789abcdef0123456789abcdef".to_string();

    let server = serve_file("cifar-10-binary.tar.gz", fake.archive.clone());
    let cache = tempfile::tempdir().unwrap();
    let spec = ArchiveSpec {
        url: server.url.clone(),
        md5: wrong.clone(),
        bytes: None,
    };
    let message = error_text(prepare_with(&cifar_options(
        "memory://data-tests/cifar-bad",
        spec.clone(),
        cache.path(),
    )));
    assert!(
        message.contains(&server.url) && message.contains(&wrong) && message.contains(&found),
        "{message}"
    );
    let kept: Vec<PathBuf> = fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|ext| ext != "lock"))
        .collect();
    assert!(
        kept.is_empty(),
        "a rejected download must not stay in the cache: {kept:?}"
    );
    assert!(read_index("memory://data-tests/cifar-bad").is_err());

    // A user's own file is only read, never removed, even when it is wrong.
    let archive = cache.path().join("mine.tar.gz");
    fs::write(&archive, &fake.archive).unwrap();
    let options = PrepareOptions {
        source: Some(archive.to_str().unwrap().to_string()),
        ..cifar_options("memory://data-tests/cifar-bad-local", spec, cache.path())
    };
    let message = error_text(prepare_with(&options));
    assert!(
        message.contains(archive.to_str().unwrap())
            && message.contains(&wrong)
            && message.contains(&found),
        "{message}"
    );
    assert_eq!(fs::read(&archive).unwrap(), fake.archive);
}

#[test]
fn cifar10_archive_with_a_truncated_batch_names_the_member() {
    let mut fake = fake_cifar(1);
    let mut tar = tar::Builder::new(Vec::new());
    fake.batches[2].1.truncate(3000);
    for (name, data) in &fake.batches {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            data.as_slice(),
        )
        .unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let bytes = gz.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("c.tar.gz");
    fs::write(&archive, &bytes).unwrap();
    let message = error_text(cifar10::cifar10(&archive, Split::Train).map(|s| s.count()));
    assert!(
        message.contains("data_batch_3.bin") && message.contains("3000"),
        "{message}"
    );
    let message = error_text(
        cifar10::cifar10(&dir.path().join("absent.tar.gz"), Split::Test).map(|s| s.count()),
    );
    assert!(message.contains("absent.tar.gz"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST
// ---------------------------------------------------------------------------------------------

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn fake_fashion(count: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let images = (0..count)
        .map(|i| {
            (0..28 * 28)
                .map(|p| ((p * 7 + i * 13) % 251 + 1) as u8)
                .collect()
        })
        .collect();
    let labels = (0..count).map(|i| ((i * 3) % 10) as u8).collect();
    (images, labels)
}

fn expected_fashion_caption(label: usize) -> String {
    let class = FASHION_MNIST_CLASSES[label];
    let article = if class == "ankle boot" { "an" } else { "a" };
    format!("a photo of {article} {class}")
}

fn assert_fashion_sample(sample: &Sample, image: &[u8], label: u8) {
    assert_eq!(sample.label, label as i64);
    assert_eq!(sample.caption, expected_fashion_caption(label as usize));
    assert_eq!(sample.pixels.len(), 32 * 32);
    for y in 0..32 {
        for x in 0..32 {
            let inside = (2..30).contains(&y) && (2..30).contains(&x);
            let expected = if inside {
                image[(y - 2) * 28 + (x - 2)]
            } else {
                0
            };
            assert_eq!(
                sample.pixels[y * 32 + x],
                expected,
                "{} at ({x}, {y})",
                sample.key
            );
        }
    }
}

#[test]
fn fashion_mnist_from_plain_and_gzipped_idx_files() {
    let (images, labels) = fake_fashion(12);
    for gzipped in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (image_bytes, label_bytes) = (idx_images(&images), idx_labels(&labels));
        let (image_bytes, label_bytes, suffix) = if gzipped {
            (gzip(&image_bytes), gzip(&label_bytes), ".gz")
        } else {
            (image_bytes, label_bytes, "")
        };
        fs::write(
            dir.path().join(format!("t10k-images-idx3-ubyte{suffix}")),
            image_bytes,
        )
        .unwrap();
        fs::write(
            dir.path().join(format!("t10k-labels-idx1-ubyte{suffix}")),
            label_bytes,
        )
        .unwrap();
        let out = dir.path().join("shards");
        let index = prepare(
            DatasetKind::FashionMnist,
            out.to_str().unwrap(),
            Some(dir.path().to_str().unwrap()),
            Split::Test,
            None,
            5,
            None,
            0,
        )
        .unwrap();
        assert_eq!(
            (index.image_size, index.channels, index.total_samples),
            (32, 1, 12)
        );
        assert_eq!(index.dataset, "fashion-mnist/test");
        let (_, samples) = read_all(out.to_str().unwrap());
        for (i, sample) in samples.iter().enumerate() {
            assert_eq!(sample.key, sample_key(i));
            assert_fashion_sample(sample, &images[i], labels[i]);
        }
        assert!(index
            .captions
            .contains(&"a photo of an ankle boot".to_string()));
    }
}

#[test]
fn bad_idx_files_are_named() {
    let (images, labels) = fake_fashion(4);
    let write = |dir: &Path, image_bytes: &[u8], label_bytes: &[u8]| {
        fs::write(dir.join("train-images-idx3-ubyte"), image_bytes).unwrap();
        fs::write(dir.join("train-labels-idx1-ubyte"), label_bytes).unwrap();
    };
    let read =
        |dir: &Path| error_text(fashion_mnist::fashion_mnist(dir, Split::Train).map(|s| s.count()));

    let dir = tempfile::tempdir().unwrap();
    let mut bad_magic = idx_images(&images);
    bad_magic[3] = 1;
    write(dir.path(), &bad_magic, &idx_labels(&labels));
    let message = read(dir.path());
    assert!(
        message.contains("train-images-idx3-ubyte") && message.contains("magic"),
        "{message}"
    );

    let full = idx_images(&images);
    write(dir.path(), &full[..full.len() - 100], &idx_labels(&labels));
    let message = read(dir.path());
    assert!(
        message.contains("train-images-idx3-ubyte") && message.contains("truncated"),
        "{message}"
    );

    write(dir.path(), &full, &idx_labels(&labels[..3]));
    let message = read(dir.path());
    assert!(
        message.contains("train-labels-idx1-ubyte") && message.contains("3 labels"),
        "{message}"
    );

    let mut bad_label = labels.clone();
    bad_label[2] = 10;
    write(dir.path(), &full, &idx_labels(&bad_label));
    let message = read(dir.path());
    assert!(
        message.contains("train-labels-idx1-ubyte") && message.contains("label 2 is 10"),
        "{message}"
    );

    fs::remove_file(dir.path().join("train-images-idx3-ubyte")).unwrap();
    let gz = gzip(&full);
    fs::write(
        dir.path().join("train-images-idx3-ubyte.gz"),
        &gz[..gz.len() / 2],
    )
    .unwrap();
    let message = read(dir.path());
    assert!(
        message.contains("train-images-idx3-ubyte.gz") && message.contains("gzip"),
        "{message}"
    );

    let empty = tempfile::tempdir().unwrap();
    let message = read(empty.path());
    assert!(
        message.contains("train-images-idx3-ubyte") && message.contains("not found"),
        "{message}"
    );
}

/// The real files, where Debian's dataset-fashion-mnist is installed: labels are read here
/// independently of the crate's IDX reader.
#[test]
fn real_fashion_mnist_first_test_samples() {
    let dir = Path::new(fashion_mnist::DEFAULT_DIR);
    if !dir.join("t10k-labels-idx1-ubyte.gz").is_file() {
        eprintln!("skipped: {} is not installed", dir.display());
        return;
    }
    let mut labels = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap())
        .read_to_end(&mut labels)
        .unwrap();
    let samples: Vec<Sample> = fashion_mnist::fashion_mnist(dir, Split::Test)
        .unwrap()
        .take(10)
        .collect();
    assert_eq!(samples.len(), 10);
    for (i, sample) in samples.iter().enumerate() {
        let label = labels[8 + i];
        assert_eq!(sample.label, label as i64);
        assert_eq!(sample.caption, expected_fashion_caption(label as usize));
        assert_eq!(sample.pixels.len(), 32 * 32);
        let border = (0..32).flat_map(|i| {
            [
                (0, i),
                (1, i),
                (30, i),
                (31, i),
                (i, 0),
                (i, 1),
                (i, 30),
                (i, 31),
            ]
        });
        assert!(border
            .into_iter()
            .all(|(y, x)| sample.pixels[y * 32 + x] == 0));
        assert!(
            sample.pixels.iter().filter(|&&p| p > 0).count() > 50,
            "{} is blank",
            sample.key
        );
    }
}

// ---------------------------------------------------------------------------------------------
// command-line names
// ---------------------------------------------------------------------------------------------

#[test]
fn dataset_and_split_names() {
    use clap::ValueEnum;
    for (name, kind) in [
        ("synthetic", DatasetKind::Synthetic),
        ("cifar10", DatasetKind::Cifar10),
        ("fashion-mnist", DatasetKind::FashionMnist),
    ] {
        assert_eq!(DatasetKind::from_str(name, false).unwrap(), kind);
        assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
        assert_eq!(kind.to_string(), name);
    }
    assert_eq!(Split::from_str("test", false).unwrap(), Split::Test);
    assert_eq!(
        serde_json::from_str::<Split>("\"train\"").unwrap(),
        Split::Train
    );
}

#[test]
fn prepare_rejects_impossible_options() {
    let message = error_text(prepare(
        DatasetKind::Cifar10,
        "memory://data-tests/x",
        None,
        Split::Train,
        None,
        10,
        Some(64),
        0,
    ));
    assert!(
        message.contains("64") && message.contains("cifar10"),
        "{message}"
    );
    let message = error_text(prepare(
        DatasetKind::Synthetic,
        "memory://data-tests/x",
        None,
        Split::Train,
        None,
        0,
        None,
        0,
    ));
    assert!(message.contains("samples per shard"), "{message}");
}
