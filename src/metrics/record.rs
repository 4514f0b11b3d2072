//! TFRecord framing, the container of TensorBoard event files: each record is
//! `u64 LE length`, `masked crc32c(length bytes)`, `data`, `masked crc32c(data)`.

use crate::error::{Error, Result};

/// TFRecord's CRC mask: rotating and offsetting keeps a CRC of data that itself holds CRCs from
/// looking like a valid frame.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends one framed record holding `data` to `out`.
pub fn frame_record(data: &[u8], out: &mut Vec<u8>) {
    let length = (data.len() as u64).to_le_bytes();
    out.reserve(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// Splits a whole TFRecord file into its records, checking both CRCs of every record.
///
/// `source` names the file in errors, which also give the byte offset of the bad record.
pub fn read_records<'a>(bytes: &'a [u8], source: &str) -> Result<Vec<&'a [u8]>> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let (data, next) = read_one(bytes, offset, source)?;
        records.push(data);
        offset = next;
    }
    Ok(records)
}

fn read_one<'a>(bytes: &'a [u8], offset: usize, source: &str) -> Result<(&'a [u8], usize)> {
    let bad = |reason: String| Error::TensorBoard {
        what: format!("{source} at byte {offset}"),
        reason,
    };
    let header = bytes.get(offset..offset + 12).ok_or_else(|| {
        bad(format!(
            "truncated record header: {} bytes left, expected 12",
            bytes.len() - offset
        ))
    })?;
    let (length_bytes, length_crc) = header.split_at(8);
    if masked_crc32c(length_bytes) != u32::from_le_bytes(length_crc.try_into().unwrap()) {
        return Err(bad("length CRC does not match".into()));
    }
    let length = u64::from_le_bytes(length_bytes.try_into().unwrap());
    let start = offset + 12;
    let end = usize::try_from(length)
        .ok()
        .and_then(|length| start.checked_add(length))
        .filter(|end| end + 4 <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "record of {length} bytes runs past the end of the file"
            ))
        })?;
    let data = &bytes[start..end];
    let data_crc = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap());
    if masked_crc32c(data) != data_crc {
        return Err(bad(format!(
            "data CRC does not match for a record of {length} bytes"
        )));
    }
    Ok((data, end + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_header_matches_real_event_files() {
        // Event files written by TensorFlow start with a 24-byte file_version record whose
        // header is these 12 bytes.
        let mut file = Vec::new();
        frame_record(&[0u8; 24], &mut file);
        assert_eq!(
            &file[..12],
            &[0x18, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0x7f, 0x4b, 0x22]
        );
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn records_round_trip() {
        let mut file = Vec::new();
        frame_record(b"first", &mut file);
        frame_record(b"", &mut file);
        frame_record(&[7u8; 300], &mut file);
        let records = read_records(&file, "mem").unwrap();
        assert_eq!(records, vec![&b"first"[..], &b""[..], &[7u8; 300][..]]);
    }

    #[test]
    fn corrupt_data_names_file_and_offset() {
        let mut file = Vec::new();
        frame_record(b"first", &mut file);
        let second = file.len();
        frame_record(b"second", &mut file);
        file[second + 13] ^= 1;
        let message = read_records(&file, "events.out.tfevents.x")
            .unwrap_err()
            .to_string();
        assert!(message.contains("events.out.tfevents.x"), "{message}");
        assert!(message.contains(&format!("byte {second}")), "{message}");
        assert!(message.contains("data CRC"), "{message}");
    }

    #[test]
    fn truncated_file_is_reported() {
        let mut file = Vec::new();
        frame_record(b"a record", &mut file);
        file.truncate(file.len() - 2);
        let message = read_records(&file, "f").unwrap_err().to_string();
        assert!(message.contains("runs past the end"), "{message}");
    }
}
