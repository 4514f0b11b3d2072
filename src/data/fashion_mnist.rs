//! Fashion-MNIST from its IDX files (plain or gzipped; Debian's `dataset-fashion-mnist` puts
//! them in /usr/share/datasets/fashion-mnist). The 28×28 grayscale images are centred on a
//! 32×32 black canvas, so they patchify like CIFAR-10 with the same model.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::shards::{sample_key, Sample};
use super::split::Split;
use crate::error::{Error, Result};

pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];
pub const IMAGE_SIZE: usize = 32;
pub const CHANNELS: usize = 1;
const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// "a photo of a trouser", "a photo of an ankle boot", …
pub fn fashion_mnist_caption(class: &str) -> String {
    let article = if class.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("a photo of {article} {class}")
}

/// Every caption, in label order.
pub fn fashion_mnist_captions() -> Vec<String> {
    FASHION_MNIST_CLASSES
        .iter()
        .map(|class| fashion_mnist_caption(class))
        .collect()
}

/// The IDX file stems of a split: (images, labels).
pub fn idx_files(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
}

/// The samples of `split` from the IDX files in `dir`, in file order, padded to 32×32×1.
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<impl Iterator<Item = Sample>> {
    let (images_stem, labels_stem) = idx_files(split);
    let images_file = find_idx(dir, images_stem)?;
    let labels_file = find_idx(dir, labels_stem)?;
    let images = read_idx(&images_file, IDX_IMAGES)?;
    let labels = read_idx(&labels_file, IDX_LABELS)?;
    let (count, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    if labels.dims[0] != count {
        return Err(Error::Dataset {
            file: labels_file.display().to_string(),
            reason: format!(
                "has {} labels, but {} has {count} images",
                labels.dims[0],
                images_file.display()
            ),
        });
    }
    if rows > IMAGE_SIZE || cols > IMAGE_SIZE || rows == 0 || cols == 0 {
        return Err(Error::Dataset {
            file: images_file.display().to_string(),
            reason: format!("images are {rows}×{cols}, expected at most {IMAGE_SIZE}×{IMAGE_SIZE}"),
        });
    }
    if let Some(i) = labels
        .data
        .iter()
        .position(|&l| l as usize >= FASHION_MNIST_CLASSES.len())
    {
        return Err(Error::Dataset {
            file: labels_file.display().to_string(),
            reason: format!("label {i} is {}, expected 0 to 9", labels.data[i]),
        });
    }
    let image_bytes = rows * cols;
    let samples = (0..count).map(move |i| {
        let label = labels.data[i] as usize;
        Sample {
            key: sample_key(i),
            pixels: pad_centred(&images.data[i * image_bytes..][..image_bytes], rows, cols),
            caption: fashion_mnist_caption(FASHION_MNIST_CLASSES[label]),
            label: label as i64,
        }
    });
    Ok(samples)
}

/// `dir/stem` if present, else `dir/stem.gz`.
fn find_idx(dir: &Path, stem: &str) -> Result<PathBuf> {
    let plain = dir.join(stem);
    let gz = dir.join(format!("{stem}.gz"));
    if plain.is_file() {
        return Ok(plain);
    }
    if gz.is_file() {
        return Ok(gz);
    }
    Err(Error::Dataset {
        file: plain.display().to_string(),
        reason: format!(
            "not found (nor {}); install Debian's dataset-fashion-mnist or pass --source DIR",
            gz.display()
        ),
    })
}

/// What an IDX file must hold: its magic number and number of dimensions.
#[derive(Clone, Copy, Debug)]
pub struct IdxKind {
    pub magic: u32,
    pub dims: usize,
    pub what: &'static str,
}

pub const IDX_IMAGES: IdxKind = IdxKind {
    magic: IMAGES_MAGIC,
    dims: 3,
    what: "IDX unsigned-byte images",
};
pub const IDX_LABELS: IdxKind = IdxKind {
    magic: LABELS_MAGIC,
    dims: 1,
    what: "IDX unsigned-byte labels",
};

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file (gunzipped on the fly if its name ends in `.gz`) and checks its magic
/// number and that it holds exactly the bytes its header announces.
pub fn read_idx(path: &Path, kind: IdxKind) -> Result<Idx> {
    let idx_error = |reason: String| Error::Dataset {
        file: path.display().to_string(),
        reason,
    };
    let raw = fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if path.extension().is_some_and(|ext| ext == "gz") {
        let mut out = Vec::with_capacity(raw.len() * 2);
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| idx_error(format!("not a readable gzip file (truncated?): {e}")))?;
        out
    } else {
        raw
    };
    let header_len = 4 + 4 * kind.dims;
    if bytes.len() < header_len {
        return Err(idx_error(format!(
            "truncated: {} bytes, shorter than the {header_len}-byte header of {}",
            bytes.len(),
            kind.what
        )));
    }
    let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != kind.magic {
        return Err(idx_error(format!(
            "bad magic number 0x{magic:08x}, expected 0x{:08x} ({})",
            kind.magic, kind.what
        )));
    }
    let dims: Vec<usize> = (0..kind.dims)
        .map(|d| {
            u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected = dims.iter().product::<usize>();
    let found = bytes.len() - header_len;
    if found != expected {
        let state = if found < expected {
            "truncated"
        } else {
            "too long"
        };
        return Err(idx_error(format!(
            "{state}: the header announces {dims:?} = {expected} data bytes, the file has {found}"
        )));
    }
    let mut data = bytes;
    data.drain(..header_len);
    Ok(Idx { dims, data })
}

/// Centres a `rows × cols` image on a black `IMAGE_SIZE²` canvas.
fn pad_centred(image: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (top, left) = ((IMAGE_SIZE - rows) / 2, (IMAGE_SIZE - cols) / 2);
    let mut canvas = vec![0u8; IMAGE_SIZE * IMAGE_SIZE];
    for (y, row) in image.chunks_exact(cols).enumerate() {
        let start = (top + y) * IMAGE_SIZE + left;
        canvas[start..start + cols].copy_from_slice(row);
    }
    canvas
}
