//! Caption shards: WebDataset-compatible tar files (`<key>.png`, `<key>.txt`, `<key>.cls` per
//! sample) plus an `index.json` that lists every shard with its size and sha256, so a reader can
//! tell a complete, intact dataset from a damaged or half-written one before decoding anything.
//!
//! Shards are parsed in memory, never extracted, so member names cannot reach the file system.
//! A dataset lives under one prefix [`Location`]: `index.json` and the shards are joined below
//! it, and shard names that could step outside it are refused when the index is read.

use std::collections::{BTreeSet, HashSet};
use std::io::Cursor;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::storage::Location;

pub const INDEX_FILE: &str = "index.json";
/// Channel counts a shard image may have: gray, gray + alpha, RGB, RGBA (8 bits each).
pub const SUPPORTED_CHANNELS: std::ops::RangeInclusive<usize> = 1..=4;

/// What `index.json` says about a prepared dataset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardIndex {
    pub dataset: String,
    pub image_size: usize,
    pub channels: usize,
    pub total_samples: usize,
    /// The distinct captions, sorted, so the text-embedding cache can be filled up front.
    pub captions: Vec<String>,
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// File name inside the prefix, e.g. `shard-000000.tar`.
    pub name: String,
    pub samples: usize,
    pub bytes: u64,
    pub sha256: String,
}

/// One captioned image.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub key: String,
    /// `image_size × image_size × channels` bytes, row-major, channels last.
    pub pixels: Vec<u8>,
    pub caption: String,
    pub label: i64,
}

/// `shard-000123.tar`: zero-padded so that names sort in writing order.
pub fn shard_name(number: usize) -> String {
    format!("shard-{number:06}.tar")
}

/// The key of the `number`-th sample of a dataset: zero-padded so keys sort in sample order.
pub fn sample_key(number: usize) -> String {
    format!("{number:08}")
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads and validates `<prefix>/index.json`.
pub fn read_index(prefix_url: &str) -> Result<ShardIndex> {
    read_index_at(&Location::parse(prefix_url)?)
}

/// [`read_index`] of a prefix already parsed.
pub fn read_index_at(prefix: &Location) -> Result<ShardIndex> {
    read_index_and_bytes_at(prefix).map(|(index, _)| index)
}

/// [`read_index_at`] and the bytes it parsed, for callers that key derived data (FID
/// statistics) by the index's hash without fetching it twice.
pub fn read_index_and_bytes_at(prefix: &Location) -> Result<(ShardIndex, bytes::Bytes)> {
    let file = prefix.join(INDEX_FILE)?;
    let url = file.url();
    let bytes = file.get()?.ok_or_else(|| Error::Dataset {
        file: url.to_string(),
        reason: "not found: no prepared dataset here (run `ditrun prepare`), \
                 or its prepare did not finish (index.json is written last)"
            .to_string(),
    })?;
    let index = parse_index(url, &bytes)?;
    validate_index(url, &index)?;
    Ok((index, bytes))
}

/// Fetches shard number `shard` of `index`, checks its size and sha256 against the index and
/// decodes its samples, in the order they were written.
pub fn read_shard(prefix_url: &str, index: &ShardIndex, shard: usize) -> Result<Vec<Sample>> {
    read_shard_at(&Location::parse(prefix_url)?, index, shard)
}

/// [`read_shard`] under a prefix already parsed.
pub fn read_shard_at(prefix: &Location, index: &ShardIndex, shard: usize) -> Result<Vec<Sample>> {
    let entry = index.shards.get(shard).ok_or_else(|| Error::Shard {
        shard: format!("#{shard} under {prefix}"),
        reason: format!("index.json lists only {} shards", index.shards.len()),
    })?;
    let file = prefix.join(&entry.name)?;
    let shard_url = file.url();
    let bytes = file.get()?.ok_or_else(|| Error::Shard {
        shard: shard_url.to_string(),
        reason: format!(
            "missing: index.json lists it ({} samples, {} bytes) but the store has no such object",
            entry.samples, entry.bytes
        ),
    })?;
    verify_shard_bytes(shard_url, entry, &bytes)?;
    let samples = parse_shard(shard_url, &bytes, index.image_size, index.channels)?;
    if samples.len() != entry.samples {
        return Err(Error::Shard {
            shard: shard_url.to_string(),
            reason: format!(
                "holds {} samples, index.json says {}",
                samples.len(),
                entry.samples
            ),
        });
    }
    Ok(samples)
}

/// Checks a fetched shard's length and sha256 against its index entry.
pub fn verify_shard_bytes(shard_url: &str, entry: &ShardEntry, bytes: &[u8]) -> Result<()> {
    let shard_error = |reason: String| Error::Shard {
        shard: shard_url.to_string(),
        reason,
    };
    if bytes.len() as u64 != entry.bytes {
        return Err(shard_error(format!(
            "has {} bytes, index.json says {} (truncated or replaced since it was written)",
            bytes.len(),
            entry.bytes
        )));
    }
    let found = hex::encode(Sha256::digest(bytes));
    if found != entry.sha256 {
        return Err(shard_error(format!(
            "sha256 {found} does not match index.json's {} (the shard is damaged or was replaced)",
            entry.sha256
        )));
    }
    Ok(())
}

/// Decodes every sample of one shard's tar bytes; `shard_url` only names it in errors.
///
/// Members are grouped WebDataset-style: the key is the member's path up to the first `.` of
/// its file name, and one sample's members are consecutive. Unknown extensions are skipped.
pub fn parse_shard(
    shard_url: &str,
    bytes: &[u8],
    image_size: usize,
    channels: usize,
) -> Result<Vec<Sample>> {
    let shard_error = |reason: String| Error::Shard {
        shard: shard_url.to_string(),
        reason,
    };
    let mut archive = tar::Archive::new(Cursor::new(bytes));
    let entries = archive
        .entries_with_seek()
        .map_err(|e| shard_error(format!("not a readable tar file: {e}")))?;
    let mut samples = Vec::new();
    let mut finished_keys = HashSet::new();
    let mut current: Option<RawSample> = None;
    for entry in entries {
        let entry = entry.map_err(|e| shard_error(format!("not a readable tar file: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let (key, extension) = split_member_name(&member);
        let start = entry.raw_file_position() as usize;
        let data = start
            .checked_add(entry.size() as usize)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| {
                shard_error(format!("member `{member}` runs past the end of the file"))
            })?;
        if current.as_ref().is_some_and(|raw| raw.key != key) {
            let raw = current.take().expect("checked above");
            finished_keys.insert(raw.key.clone());
            samples.push(raw.decode(shard_url, image_size, channels)?);
        }
        if current.is_none() && finished_keys.contains(key) {
            return Err(sample_error(
                shard_url,
                key,
                "appears twice: its members are not consecutive",
            ));
        }
        current
            .get_or_insert_with(|| RawSample::new(key))
            .add(shard_url, extension, data)?;
    }
    if let Some(raw) = current {
        samples.push(raw.decode(shard_url, image_size, channels)?);
    }
    Ok(samples)
}

/// `dir/00000012.png` → (`dir/00000012`, `png`); the extension is everything after the first
/// dot of the file name, as WebDataset defines it.
fn split_member_name(member: &str) -> (&str, &str) {
    let name_start = member.rfind('/').map_or(0, |slash| slash + 1);
    match member[name_start..].find('.') {
        Some(dot) => (&member[..name_start + dot], &member[name_start + dot + 1..]),
        None => (member, ""),
    }
}

fn sample_error(shard_url: &str, key: &str, reason: impl Into<String>) -> Error {
    Error::ShardSample {
        shard: shard_url.to_string(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The members of one sample, borrowed from the shard's bytes until decoded.
struct RawSample<'a> {
    key: String,
    png: Option<&'a [u8]>,
    txt: Option<&'a [u8]>,
    cls: Option<&'a [u8]>,
}

impl<'a> RawSample<'a> {
    fn new(key: &str) -> Self {
        Self {
            key: key.to_string(),
            png: None,
            txt: None,
            cls: None,
        }
    }

    fn add(&mut self, shard_url: &str, extension: &str, data: &'a [u8]) -> Result<()> {
        let slot = match extension {
            "png" => &mut self.png,
            "txt" => &mut self.txt,
            "cls" => &mut self.cls,
            _ => return Ok(()),
        };
        if slot.replace(data).is_some() {
            return Err(sample_error(
                shard_url,
                &self.key,
                format!("has two `.{extension}` members"),
            ));
        }
        Ok(())
    }

    fn decode(self, shard_url: &str, image_size: usize, channels: usize) -> Result<Sample> {
        let missing =
            |ext: &str| sample_error(shard_url, &self.key, format!("has no `.{ext}` member"));
        let png = self.png.ok_or_else(|| missing("png"))?;
        let txt = self.txt.ok_or_else(|| missing("txt"))?;
        let cls = self.cls.ok_or_else(|| missing("cls"))?;
        let pixels = decode_png(png, image_size, channels)
            .map_err(|reason| sample_error(shard_url, &self.key, reason))?;
        let caption = std::str::from_utf8(txt)
            .map_err(|e| sample_error(shard_url, &self.key, format!("`.txt` is not UTF-8: {e}")))?
            .trim_end_matches(['\n', '\r'])
            .to_string();
        let label = std::str::from_utf8(cls)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                sample_error(
                    shard_url,
                    &self.key,
                    format!(
                        "`.cls` holds `{}`, expected a decimal integer label",
                        String::from_utf8_lossy(cls).escape_debug()
                    ),
                )
            })?;
        Ok(Sample {
            key: self.key,
            pixels,
            caption,
            label,
        })
    }
}

fn color_type_for(channels: usize) -> Option<png::ColorType> {
    match channels {
        1 => Some(png::ColorType::Grayscale),
        2 => Some(png::ColorType::GrayscaleAlpha),
        3 => Some(png::ColorType::Rgb),
        4 => Some(png::ColorType::Rgba),
        _ => None,
    }
}

fn channels_of(color: png::ColorType) -> Option<usize> {
    match color {
        png::ColorType::Grayscale => Some(1),
        png::ColorType::GrayscaleAlpha => Some(2),
        png::ColorType::Rgb => Some(3),
        png::ColorType::Rgba => Some(4),
        png::ColorType::Indexed => None,
    }
}

/// Decodes an 8-bit PNG that must be `image_size²` pixels of `channels` channels.
pub fn decode_png(
    data: &[u8],
    image_size: usize,
    channels: usize,
) -> std::result::Result<Vec<u8>, String> {
    let corrupt = |e: png::DecodingError| format!("corrupt PNG: {e}");
    let mut reader = png::Decoder::new(Cursor::new(data))
        .read_info()
        .map_err(corrupt)?;
    let (width, height) = (reader.info().width as usize, reader.info().height as usize);
    let (color, depth) = reader.output_color_type();
    let found_channels = channels_of(color)
        .filter(|_| depth == png::BitDepth::Eight)
        .ok_or_else(|| {
            format!("PNG is {color:?} at {depth:?} bits, expected 8-bit with {channels} channels")
        })?;
    if (width, height, found_channels) != (image_size, image_size, channels) {
        return Err(format!(
            "image is {width}×{height}×{found_channels}, index.json says {image_size}×{image_size}×{channels}"
        ));
    }
    let mut pixels = vec![0; image_size * image_size * channels];
    reader.next_frame(&mut pixels).map_err(corrupt)?;
    Ok(pixels)
}

// ---------------------------------------------------------------------------------------------
// index.json
// ---------------------------------------------------------------------------------------------

/// Parses `index.json` field by field, so a wrong field is named in the error (serde_json
/// alone reports a line and column, not which field of which shard).
fn parse_index(url: &str, bytes: &[u8]) -> Result<ShardIndex> {
    let field_error = |field: &str, reason: String| Error::ShardIndex {
        url: url.to_string(),
        field: field.to_string(),
        reason,
    };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| field_error("(file)", format!("not valid JSON: {e}")))?;
    let top = value
        .as_object()
        .ok_or_else(|| field_error("(file)", "expected a JSON object".to_string()))?;
    let shards: Vec<Value> = field(url, top, "", "shards")?;
    let shards = shards
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            let path = format!("shards[{i}].");
            let object = shard.as_object().ok_or_else(|| {
                field_error(&format!("shards[{i}]"), "expected an object".to_string())
            })?;
            Ok(ShardEntry {
                name: field(url, object, &path, "name")?,
                samples: field(url, object, &path, "samples")?,
                bytes: field(url, object, &path, "bytes")?,
                sha256: field(url, object, &path, "sha256")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardIndex {
        dataset: field(url, top, "", "dataset")?,
        image_size: field(url, top, "", "image_size")?,
        channels: field(url, top, "", "channels")?,
        total_samples: field(url, top, "", "total_samples")?,
        captions: field(url, top, "", "captions")?,
        shards,
    })
}

fn field<T: DeserializeOwned>(
    url: &str,
    object: &Map<String, Value>,
    path: &str,
    name: &str,
) -> Result<T> {
    let error = |reason: String| Error::ShardIndex {
        url: url.to_string(),
        field: format!("{path}{name}"),
        reason,
    };
    let value = object
        .get(name)
        .ok_or_else(|| error("missing".to_string()))?;
    T::deserialize(value).map_err(|e| error(e.to_string()))
}

/// Checks what JSON types cannot: counts that add up, sane sizes, safe shard names.
fn validate_index(url: &str, index: &ShardIndex) -> Result<()> {
    let error = |field: String, reason: String| Error::ShardIndex {
        url: url.to_string(),
        field,
        reason,
    };
    if index.image_size == 0 {
        return Err(error("image_size".into(), "must be at least 1".into()));
    }
    if !SUPPORTED_CHANNELS.contains(&index.channels) {
        return Err(error(
            "channels".into(),
            format!("is {}, expected 1 to 4", index.channels),
        ));
    }
    if index.shards.is_empty() {
        return Err(error(
            "shards".into(),
            "is empty: the dataset has no shards".into(),
        ));
    }
    let listed: usize = index.shards.iter().map(|s| s.samples).sum();
    if listed != index.total_samples {
        return Err(error(
            "total_samples".into(),
            format!(
                "is {}, but the shards hold {listed} samples",
                index.total_samples
            ),
        ));
    }
    if !index.captions.windows(2).all(|pair| pair[0] < pair[1]) {
        return Err(error(
            "captions".into(),
            "must be sorted and distinct".into(),
        ));
    }
    let mut names = HashSet::new();
    for (i, shard) in index.shards.iter().enumerate() {
        if !is_safe_shard_name(&shard.name) {
            return Err(error(
                format!("shards[{i}].name"),
                format!("`{}` is not a plain `*.tar` file name", shard.name),
            ));
        }
        if !names.insert(shard.name.as_str()) {
            return Err(error(
                format!("shards[{i}].name"),
                format!("`{}` is listed twice", shard.name),
            ));
        }
        if shard.samples == 0 {
            return Err(error(
                format!("shards[{i}].samples"),
                "must be at least 1".into(),
            ));
        }
        let is_sha256 = shard.sha256.len() == 64
            && shard
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !is_sha256 {
            return Err(error(
                format!("shards[{i}].sha256"),
                format!("`{}` is not 64 lowercase hex digits", shard.sha256),
            ));
        }
    }
    Ok(())
}

/// Shard names become object paths under the prefix; anything that could step outside it
/// (`..`, separators) is refused.
fn is_safe_shard_name(name: &str) -> bool {
    name.ends_with(".tar")
        && name.len() > 4
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Writes samples into shards of `samples_per_shard` under a prefix URL, then `index.json`.
///
/// Each shard is uploaded as soon as it is full. `index.json` is written only by
/// [`ShardWriter::finish`], after every shard, and any earlier `index.json` at the prefix is
/// removed when the writer starts: a prepare that crashes midway never looks complete.
pub struct ShardWriter {
    prefix: Location,
    dataset: String,
    image_size: usize,
    channels: usize,
    samples_per_shard: usize,
    tar: tar::Builder<Vec<u8>>,
    in_shard: usize,
    shards: Vec<ShardEntry>,
    captions: BTreeSet<String>,
    last_key: Option<String>,
}

impl ShardWriter {
    pub fn new(
        prefix_url: &str,
        dataset: &str,
        image_size: usize,
        channels: usize,
        samples_per_shard: usize,
    ) -> Result<Self> {
        let prefix = Location::parse(prefix_url)?;
        Self::at(prefix, dataset, image_size, channels, samples_per_shard)
    }

    /// [`new`](Self::new) under a prefix already parsed.
    pub fn at(
        prefix: Location,
        dataset: &str,
        image_size: usize,
        channels: usize,
        samples_per_shard: usize,
    ) -> Result<Self> {
        let prefix_url = prefix.url();
        if image_size == 0 {
            return Err(Error::Config(format!(
                "shards for {prefix_url}: image size must be at least 1"
            )));
        }
        if color_type_for(channels).is_none() {
            return Err(Error::Config(format!(
                "shards for {prefix_url}: {channels} channels, expected 1 to 4"
            )));
        }
        if samples_per_shard == 0 {
            return Err(Error::Config(format!(
                "shards for {prefix_url}: samples per shard must be at least 1"
            )));
        }
        if prefix.join(INDEX_FILE)?.delete()? {
            warn!(prefix = %prefix, "replacing the dataset prepared here before; its index.json is removed until the new one is complete");
        }
        Ok(Self {
            prefix,
            dataset: dataset.to_string(),
            image_size,
            channels,
            samples_per_shard,
            tar: tar::Builder::new(Vec::new()),
            in_shard: 0,
            shards: Vec::new(),
            captions: BTreeSet::new(),
            last_key: None,
        })
    }

    /// The storage URL this writer writes under.
    pub fn prefix_url(&self) -> &str {
        self.prefix.url()
    }

    /// Adds one sample; keys must be non-empty, of `[A-Za-z0-9_-]`, and increase strictly, so
    /// that they are unique and in order.
    pub fn write(&mut self, sample: Sample) -> Result<()> {
        let shard = self.prefix.join(&shard_name(self.shards.len()))?;
        let shard_url = shard.url();
        self.check_sample(shard_url, &sample)?;
        let png = self
            .encode_png(&sample.pixels)
            .map_err(|e| sample_error(shard_url, &sample.key, format!("cannot encode PNG: {e}")))?;
        let label = sample.label.to_string();
        let members: [(&str, &[u8]); 3] = [
            ("png", &png),
            ("txt", sample.caption.as_bytes()),
            ("cls", label.as_bytes()),
        ];
        for (extension, data) in members {
            append_member(&mut self.tar, &format!("{}.{extension}", sample.key), data).map_err(
                |e| {
                    sample_error(
                        shard_url,
                        &sample.key,
                        format!("cannot add `.{extension}` to the tar: {e}"),
                    )
                },
            )?;
        }
        self.captions.insert(sample.caption);
        self.last_key = Some(sample.key);
        self.in_shard += 1;
        if self.in_shard == self.samples_per_shard {
            self.flush_shard()?;
        }
        Ok(())
    }

    /// Uploads the last, partial shard and then `index.json`.
    pub fn finish(mut self) -> Result<ShardIndex> {
        if self.in_shard > 0 {
            self.flush_shard()?;
        }
        if self.shards.is_empty() {
            return Err(Error::Dataset {
                file: self.prefix.url().to_string(),
                reason: "no samples were written, so no index.json either".to_string(),
            });
        }
        let index = ShardIndex {
            dataset: self.dataset.clone(),
            image_size: self.image_size,
            channels: self.channels,
            total_samples: self.shards.iter().map(|s| s.samples).sum(),
            captions: std::mem::take(&mut self.captions).into_iter().collect(),
            shards: std::mem::take(&mut self.shards),
        };
        let json = serde_json::to_vec_pretty(&index).expect("an index always serialises");
        self.prefix.join(INDEX_FILE)?.put(json)?;
        info!(
            prefix = %self.prefix,
            shards = index.shards.len(),
            samples = index.total_samples,
            captions = index.captions.len(),
            "shards complete; index.json written"
        );
        Ok(index)
    }

    fn check_sample(&self, shard_url: &str, sample: &Sample) -> Result<()> {
        let valid_key = !sample.key.is_empty()
            && sample
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !valid_key {
            return Err(sample_error(
                shard_url,
                &sample.key,
                "key must be non-empty and of [A-Za-z0-9_-] only",
            ));
        }
        if let Some(last) = self
            .last_key
            .as_deref()
            .filter(|last| **last >= *sample.key)
        {
            return Err(sample_error(
                shard_url,
                &sample.key,
                format!("keys must increase, but it follows `{last}`"),
            ));
        }
        let expected = self.image_size * self.image_size * self.channels;
        if sample.pixels.len() != expected {
            return Err(sample_error(
                shard_url,
                &sample.key,
                format!(
                    "has {} pixel bytes, expected {expected} ({size}×{size}×{channels})",
                    sample.pixels.len(),
                    size = self.image_size,
                    channels = self.channels
                ),
            ));
        }
        Ok(())
    }

    fn encode_png(&self, pixels: &[u8]) -> std::result::Result<Vec<u8>, png::EncodingError> {
        let size = self.image_size as u32;
        let mut out = Vec::with_capacity(pixels.len() / 2 + 128);
        let mut encoder = png::Encoder::new(&mut out, size, size);
        encoder.set_color(color_type_for(self.channels).expect("checked in new"));
        encoder.set_depth(png::BitDepth::Eight);
        // Shards are written once and decoded every epoch. Without row filters decoding ran
        // 2× faster on Fashion-MNIST (59k vs 27k images/s, one core) for 3% larger shards.
        encoder.set_compression(png::Compression::Fast);
        encoder.set_filter(png::Filter::NoFilter);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(pixels)?;
        writer.finish()?;
        Ok(out)
    }

    fn flush_shard(&mut self) -> Result<()> {
        let name = shard_name(self.shards.len());
        let shard = self.prefix.join(&name)?;
        let shard_url = shard.url();
        let tar = std::mem::replace(&mut self.tar, tar::Builder::new(Vec::new()));
        let bytes = tar.into_inner().map_err(|e| Error::Shard {
            shard: shard_url.to_string(),
            reason: format!("cannot finish the tar: {e}"),
        })?;
        let entry = ShardEntry {
            name: name.clone(),
            samples: self.in_shard,
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        };
        shard.put(bytes)?;
        debug!(shard = %shard_url, samples = entry.samples, bytes = entry.bytes, "shard written");
        self.shards.push(entry);
        self.in_shard = 0;
        Ok(())
    }
}

/// Appends a regular file with fixed metadata, so that the same samples always give
/// byte-identical shards (and sha256s).
fn append_member(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    tar.append_data(&mut header, name, data)
}
