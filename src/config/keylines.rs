//! Line numbers of the keys in a block-style YAML file. `serde_norway::Value` keeps no
//! positions, yet a value rejected after merging should still point at the line that set it.

use std::collections::HashMap;

/// Maps dotted key paths (`train.lr`) to their 1-based line. Keys inside flow collections
/// (`model: {dim: 4}`) or sequences are not listed; callers fall back to the enclosing key.
pub(crate) fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    let mut open: Vec<(usize, String)> = Vec::new();
    // Indentation of a key whose value is a block scalar (`|`, `>`): deeper lines are text.
    let mut block_scalar_indent: Option<usize> = None;
    for (index, raw) in text.lines().enumerate() {
        let body = raw.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = raw.len() - body.len();
        if let Some(parent) = block_scalar_indent {
            if indent > parent {
                continue;
            }
            block_scalar_indent = None;
        }
        if body.starts_with("---") || body.starts_with("...") || body.starts_with('-') {
            continue;
        }
        let Some((key, rest)) = leading_key(body) else {
            continue;
        };
        while open.last().is_some_and(|(depth, _)| *depth >= indent) {
            open.pop();
        }
        let path = open
            .iter()
            .map(|(_, k)| k.as_str())
            .chain(std::iter::once(key.as_str()))
            .collect::<Vec<_>>()
            .join(".");
        lines.entry(path).or_insert(index + 1);
        if rest.starts_with('|') || rest.starts_with('>') {
            block_scalar_indent = Some(indent);
        }
        open.push((indent, key));
    }
    lines
}

/// `key: rest` → (`key`, `rest` trimmed), for plain and quoted keys.
fn leading_key(body: &str) -> Option<(String, &str)> {
    let (key, after) = if let Some(quote @ ('"' | '\'')) = body.chars().next() {
        let end = body[1..].find(quote)? + 1;
        (body[1..end].to_string(), &body[end + 1..])
    } else {
        let end = body.find(':')?;
        (body[..end].trim_end().to_string(), &body[end..])
    };
    let rest = after.strip_prefix(':')?;
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) || key.is_empty() {
        return None;
    }
    Some((key, rest.trim()))
}
