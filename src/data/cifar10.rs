//! CIFAR-10 from the official binary archive (`cifar-10-binary.tar.gz`): downloaded into the
//! cache and verified by MD5, or read from a local copy, and decoded straight from the
//! compressed tar without extracting it.
//!
//! Each record of a batch file is 1 label byte then 3072 bytes: the red, green and blue planes
//! of a 32×32 image, each row-major.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use md5::Md5;
use tracing::{info, warn};
use url::Url;

use super::shards::{sample_key, Sample};
use super::split::Split;
use crate::error::{Error, Result};
use crate::storage::weights;

pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const CIFAR10_BYTES: u64 = 170_052_171;
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
pub const IMAGE_SIZE: usize = 32;
pub const CHANNELS: usize = 3;
const PLANE: usize = IMAGE_SIZE * IMAGE_SIZE;
pub const RECORD_BYTES: usize = 1 + CHANNELS * PLANE;
const BATCH_DIR: &str = "cifar-10-batches-bin";
const META_FILE: &str = "batches.meta.txt";

/// Where the archive comes from and what it must hash to. The official one by default; tests
/// substitute small archives in the same format.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchiveSpec {
    pub url: String,
    /// Lowercase hex MD5 of the whole `.tar.gz`.
    pub md5: String,
    /// Expected size, for progress logs only (the MD5 is what decides).
    pub bytes: Option<u64>,
}

impl ArchiveSpec {
    pub fn official() -> Self {
        Self {
            url: CIFAR10_URL.to_string(),
            md5: CIFAR10_MD5.to_string(),
            bytes: Some(CIFAR10_BYTES),
        }
    }
}

impl Default for ArchiveSpec {
    fn default() -> Self {
        Self::official()
    }
}

/// "a photo of an airplane", "a photo of a bird", …: the seed's captions.
pub fn cifar10_caption(class: &str) -> String {
    let article = if class.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("a photo of {article} {class}")
}

/// Every caption, in label order.
pub fn cifar10_captions() -> Vec<String> {
    CIFAR10_CLASSES
        .iter()
        .map(|class| cifar10_caption(class))
        .collect()
}

/// The batch files of a split, in the order their records are numbered.
pub fn batch_files(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &[
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        Split::Test => &["test_batch.bin"],
    }
}

/// A local, MD5-verified copy of the archive.
///
/// - `source` `None`: `spec.url` is downloaded into `cache_dir` (reused there while its MD5
///   matches);
/// - an `http://` or `https://` URL: downloaded the same way, checked against `spec.md5`;
/// - a local path or `file://` URL: used in place and only read; a wrong MD5 is an error and
///   the file is left alone.
pub fn locate_archive(
    source: Option<&str>,
    spec: &ArchiveSpec,
    cache_dir: &Path,
) -> Result<PathBuf> {
    let source = source.unwrap_or(&spec.url);
    if source.starts_with("http://") || source.starts_with("https://") {
        return download_archive(source, spec, cache_dir);
    }
    let path = local_path(source)?;
    let found = md5_of_file(&path)?;
    if found != spec.md5 {
        return Err(Error::Md5 {
            file: path.display().to_string(),
            expected: spec.md5.clone(),
            found,
        });
    }
    Ok(path)
}

fn local_path(source: &str) -> Result<PathBuf> {
    if source.starts_with("file://") {
        return Url::parse(source)
            .ok()
            .and_then(|url| url.to_file_path().ok())
            .ok_or_else(|| Error::Config(format!("`{source}` is not a valid file:// URL")));
    }
    if source.contains("://") {
        return Err(Error::Config(format!(
            "CIFAR-10 source `{source}`: expected a local path, a file:// URL or an http(s):// URL"
        )));
    }
    Ok(PathBuf::from(source))
}

/// Downloads into `cache_dir/<file name>.part` with the weights' downloader (an interrupted
/// download resumes with a Range request; ranks on one node take turns through a lock) and
/// renames it to its final name only once its MD5 matches, so the final name always holds a
/// verified archive.
fn download_archive(url: &str, spec: &ArchiveSpec, cache_dir: &Path) -> Result<PathBuf> {
    let name = Url::parse(url)
        .ok()
        .and_then(|u| u.path_segments()?.next_back().map(str::to_string))
        .filter(|name| !name.is_empty() && name != "." && name != "..")
        .unwrap_or_else(|| "cifar-10-binary.tar.gz".to_string());
    let dest = cache_dir.join(&name);
    fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    let _lock = weights::lock_entry(&dest, url)?;
    if dest.is_file() {
        let found = md5_of_file(&dest)?;
        if found == spec.md5 {
            info!(archive = %dest.display(), "using the cached CIFAR-10 archive");
            return Ok(dest);
        }
        warn!(archive = %dest.display(), expected = %spec.md5, found = %found, "cached archive does not match the expected MD5; downloading again");
    }
    let part = weights::sidecar(&dest, "part");
    info!(url, bytes = ?spec.bytes, "downloading CIFAR-10");
    weights::http_download(url, &part)?;
    let found = md5_of_file(&part)?;
    if found != spec.md5 {
        // A corrupt partial must not be resumed, or every retry would fail the same way.
        let _ = fs::remove_file(&part);
        return Err(Error::Md5 {
            file: url.to_string(),
            expected: spec.md5.clone(),
            found,
        });
    }
    fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))?;
    info!(archive = %dest.display(), "CIFAR-10 archive downloaded and verified");
    Ok(dest)
}

fn md5_of_file(path: &Path) -> Result<String> {
    crate::storage::weights::digest_file::<Md5>(path)
}

/// The samples of `split`, read from the archive at `archive`: keys number the records of the
/// split's batch files in order, captions come from [`cifar10_caption`].
pub fn cifar10(archive: &Path, split: Split) -> Result<impl Iterator<Item = Sample>> {
    let wanted = batch_files(split);
    let members = read_members(archive, wanted)?;
    let mut batches = Vec::with_capacity(wanted.len());
    for (name, data) in wanted.iter().zip(members) {
        let member = format!("{}!{BATCH_DIR}/{name}", archive.display());
        let data = data.ok_or_else(|| Error::Dataset {
            file: archive.display().to_string(),
            reason: format!("has no {BATCH_DIR}/{name}; not a CIFAR-10 binary archive?"),
        })?;
        check_batch(&member, &data)?;
        batches.push(data);
    }
    let samples = batches
        .into_iter()
        .flat_map(|batch| {
            (0..batch.len() / RECORD_BYTES)
                .map(move |i| record_to_image(&batch[i * RECORD_BYTES..][..RECORD_BYTES]))
        })
        .enumerate()
        .map(|(index, (label, pixels))| Sample {
            key: sample_key(index),
            pixels,
            caption: cifar10_caption(CIFAR10_CLASSES[label]),
            label: label as i64,
        });
    Ok(samples)
}

/// Reads the members named in `wanted` (by file name, in any folder) from the `.tar.gz`, and
/// checks `batches.meta.txt` if present, since captions come from the class order.
fn read_members(archive: &Path, wanted: &[&str]) -> Result<Vec<Option<Vec<u8>>>> {
    let archive_error = |reason: String| Error::Dataset {
        file: archive.display().to_string(),
        reason,
    };
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let gz = flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 20, file));
    let mut tar = tar::Archive::new(gz);
    let mut found: Vec<Option<Vec<u8>>> = vec![None; wanted.len()];
    let entries = tar
        .entries()
        .map_err(|e| archive_error(format!("not a readable .tar.gz: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_error(format!("not a readable .tar.gz: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = path.rsplit('/').next().unwrap_or(&path).to_string();
        let slot = wanted.iter().position(|w| *w == name);
        if slot.is_none() && name != META_FILE {
            continue;
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| archive_error(format!("cannot read {path}: {e}")))?;
        match slot {
            Some(i) => found[i] = Some(data),
            None => check_meta(&format!("{}!{path}", archive.display()), &data)?,
        }
    }
    Ok(found)
}

fn check_meta(file: &str, data: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(data);
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if names != CIFAR10_CLASSES {
        return Err(Error::Dataset {
            file: file.to_string(),
            reason: format!("lists the classes {names:?}, expected {CIFAR10_CLASSES:?}"),
        });
    }
    Ok(())
}

fn check_batch(member: &str, data: &[u8]) -> Result<()> {
    let batch_error = |reason: String| Error::Dataset {
        file: member.to_string(),
        reason,
    };
    if data.is_empty() || !data.len().is_multiple_of(RECORD_BYTES) {
        return Err(batch_error(format!(
            "{} bytes is not a whole number of {RECORD_BYTES}-byte records (truncated?)",
            data.len()
        )));
    }
    let bad_label = data
        .chunks_exact(RECORD_BYTES)
        .position(|record| record[0] as usize >= CIFAR10_CLASSES.len());
    if let Some(record) = bad_label {
        return Err(batch_error(format!(
            "record {record} has label {}, expected 0 to 9",
            data[record * RECORD_BYTES]
        )));
    }
    Ok(())
}

/// (label, 32×32×3 channels-last pixels) from one record of planar R, G, B.
fn record_to_image(record: &[u8]) -> (usize, Vec<u8>) {
    let planes = &record[1..];
    let mut pixels = Vec::with_capacity(CHANNELS * PLANE);
    for i in 0..PLANE {
        pixels.extend([planes[i], planes[PLANE + i], planes[2 * PLANE + i]]);
    }
    (record[0] as usize, pixels)
}
