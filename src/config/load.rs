//! From files to a checked [`JobSpec`]: read the job and its recipes, check each file's shape on
//! its own (so errors carry that file's key path and line), deep-merge them with the `--set`
//! overrides on top, then reject impossible values, blaming the layer that set them.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_norway::{Mapping, Value};

use super::keylines::key_lines;
use super::spec::{
    CheckpointSpec, DataSpec, DistSpec, EvalSpec, JobSpec, LoggingSpec, SampleSpec,
    TextEncoderSpec, TrainSpec,
};
use crate::error::{Error, Result};
use crate::model::TextDiTConfig;

/// Path of the built-in quickstart job, relative to the repository root.
pub const QUICKSTART_JOB: &str = "jobs/quickstart.yaml";

/// The quickstart and every recipe, compiled in so `ditrun train` works from any directory.
const BUILTIN_FILES: &[(&str, &str)] = &[
    (QUICKSTART_JOB, include_str!("../../jobs/quickstart.yaml")),
    (
        "configs/dit-seed.yaml",
        include_str!("../../configs/dit-seed.yaml"),
    ),
    (
        "configs/dit-small.yaml",
        include_str!("../../configs/dit-small.yaml"),
    ),
    (
        "configs/clip-vit-b32.yaml",
        include_str!("../../configs/clip-vit-b32.yaml"),
    ),
    (
        "configs/adamw-cosine.yaml",
        include_str!("../../configs/adamw-cosine.yaml"),
    ),
    (
        "configs/sampling.yaml",
        include_str!("../../configs/sampling.yaml"),
    ),
];

/// Loads a job spec and checks it completely; nothing else has happened when this fails.
///
/// `path: None` is the built-in quickstart (exactly `jobs/quickstart.yaml` and its recipes).
/// Each `overrides` entry is `key.path=value`, the value read as YAML (`train.lr=3e-4`,
/// `sample.prompts=["a","b"]`, `text_encoder.weights=null`), applied in order after the job.
///
/// A job's `recipe:` (a path or a list of paths, relative to the file naming them) pulls in
/// recipe files; their mappings are deep-merged underneath the file (later recipes over
/// earlier, the naming file over all of them; lists and scalars are replaced, not merged).
pub fn load_job(path: Option<&Path>, overrides: &[String]) -> Result<JobSpec> {
    let (files, job_path) = match path {
        Some(path) => (Files::Disk, path.to_path_buf()),
        None => (Files::Builtin, PathBuf::from(QUICKSTART_JOB)),
    };
    let text = files.read(&job_path).map_err(|e| Error::Job {
        file: files.display(&job_path),
        line: None,
        key: None,
        message: format!("cannot read the job file: {e}"),
    })?;
    let mut layers = Vec::new();
    collect_layers(&files, &job_path, &text, &mut Vec::new(), &mut layers)?;
    let job = layers.len() - 1;
    for set in overrides {
        layers.push(override_layer(set)?);
    }
    spec_from_layers(&layers, job)
}

impl JobSpec {
    /// Reads one self-contained spec (such as [`JobSpec::to_yaml`]'s output stored in a
    /// checkpoint) and checks it; `origin` names it in errors. Recipes are not resolved here.
    pub fn from_yaml(text: &str, origin: &str) -> Result<JobSpec> {
        let layer = parse_layer(origin, text)?;
        if !layer.recipes.is_empty() {
            let message = "recipes are only resolved when loading a job file".to_string();
            return Err(job_error(
                origin,
                layer.recipe_line,
                Some("recipe"),
                message,
            ));
        }
        spec_from_layers(&[layer.layer], 0)
    }

    /// Checks a spec built in code; errors name the key path.
    pub fn validate(&self) -> Result<()> {
        match self.first_problem() {
            Some((key, reason)) => Err(job_error("job spec", None, Some(&key), reason)),
            None => Ok(()),
        }
    }
}

/// One merge layer: a file (job or recipe) or one `--set`, with where each key came from.
struct Layer {
    origin: String,
    value: Value,
    lines: HashMap<String, usize>,
}

/// A file's layer plus the recipes it names, and the line of its `recipe:` key.
struct ParsedFile {
    layer: Layer,
    recipes: Vec<String>,
    recipe_line: Option<usize>,
}

/// The shape of one file: the spec's sections, each partial (every field has a default), plus
/// `recipe`. Deserialising the text into it yields serde_norway's key path and line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only deserialised for its errors
struct FileShape {
    #[serde(default)]
    recipe: Value,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    model: TextDiTConfig,
    #[serde(default)]
    text_encoder: TextEncoderSpec,
    #[serde(default)]
    data: DataSpec,
    #[serde(default)]
    train: TrainSpec,
    #[serde(default)]
    checkpoint: CheckpointSpec,
    #[serde(default)]
    logging: LoggingSpec,
    #[serde(default)]
    sample: SampleSpec,
    #[serde(default)]
    eval: EvalSpec,
    #[serde(default)]
    dist: DistSpec,
}

enum Files {
    Disk,
    Builtin,
}

impl Files {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        match self {
            Files::Disk => std::fs::read_to_string(path),
            Files::Builtin => {
                let wanted = normalize(path);
                BUILTIN_FILES
                    .iter()
                    .find(|(name, _)| Path::new(name) == wanted)
                    .map(|(_, text)| text.to_string())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "not one of the built-in files",
                        )
                    })
            }
        }
    }

    fn display(&self, path: &Path) -> String {
        match self {
            Files::Disk => normalize(path).display().to_string(),
            Files::Builtin => format!("built-in {}", normalize(path).display()),
        }
    }
}

/// Appends the layers of `path`'s recipes (depth first, in order) and then its own.
fn collect_layers(
    files: &Files,
    path: &Path,
    text: &str,
    chain: &mut Vec<PathBuf>,
    layers: &mut Vec<Layer>,
) -> Result<()> {
    let origin = files.display(path);
    let parsed = parse_layer(&origin, text)?;
    chain.push(normalize(path));
    for recipe in &parsed.recipes {
        let recipe_path = path.parent().unwrap_or(Path::new("")).join(recipe);
        let recipe_error =
            |message: String| job_error(&origin, parsed.recipe_line, Some("recipe"), message);
        if chain.contains(&normalize(&recipe_path)) {
            let cycle: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
            return Err(recipe_error(format!(
                "`{recipe}` is already being included ({} → {}): recipes cannot include themselves",
                cycle.join(" → "),
                normalize(&recipe_path).display()
            )));
        }
        let recipe_text = files.read(&recipe_path).map_err(|e| {
            recipe_error(format!(
                "cannot read recipe `{recipe}` ({}): {e}",
                files.display(&recipe_path)
            ))
        })?;
        collect_layers(files, &recipe_path, &recipe_text, chain, layers)?;
    }
    chain.pop();
    layers.push(parsed.layer);
    Ok(())
}

fn parse_layer(origin: &str, text: &str) -> Result<ParsedFile> {
    let value: Value = serde_norway::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        job_error(origin, line, None, format!("malformed YAML: {e}"))
    })?;
    let mut value = match value {
        Value::Null => Value::Mapping(Mapping::new()),
        Value::Mapping(_) => value,
        other => {
            return Err(job_error(
                origin,
                None,
                None,
                format!(
                    "expected a mapping of sections (model, train, data, ...), found {}",
                    kind_of(&other)
                ),
            ))
        }
    };
    if value.as_mapping().is_some_and(|m| !m.is_empty()) {
        serde_norway::from_str::<FileShape>(text).map_err(|e| shape_error(origin, &e, true))?;
    }
    let lines = key_lines(text);
    let recipe = value
        .as_mapping_mut()
        .and_then(|m| m.remove("recipe"))
        .unwrap_or(Value::Null);
    let recipe_line = lines.get("recipe").copied();
    let recipes = recipe_paths(recipe).ok_or_else(|| {
        job_error(
            origin,
            recipe_line,
            Some("recipe"),
            "expected a recipe path or a list of paths".into(),
        )
    })?;
    drop_null_sections(&mut value, &skeleton());
    Ok(ParsedFile {
        layer: Layer {
            origin: origin.to_string(),
            value,
            lines,
        },
        recipes,
        recipe_line,
    })
}

fn recipe_paths(recipe: Value) -> Option<Vec<String>> {
    match recipe {
        Value::Null => Some(Vec::new()),
        Value::String(path) => Some(vec![path]),
        Value::Sequence(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(path) => Some(path),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `--set key.path=value` as a layer of its own, shape-checked like a file.
fn override_layer(set: &str) -> Result<Layer> {
    let origin = format!("--set {set}");
    let Some((key, raw)) = set.split_once('=') else {
        return Err(job_error(
            &origin,
            None,
            None,
            "expected key.path=value".into(),
        ));
    };
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(job_error(
            &origin,
            None,
            None,
            format!("`{key}` is not a key path like train.lr"),
        ));
    }
    if segments[0] == "recipe" {
        return Err(job_error(
            &origin,
            None,
            Some(key),
            "recipes can only be named in a job file".into(),
        ));
    }
    let value: Value = serde_norway::from_str(raw).map_err(|e| {
        job_error(
            &origin,
            None,
            Some(key),
            format!("value `{raw}` is not valid YAML: {e}"),
        )
    })?;
    let mut nested = segments.iter().rev().fold(value, |inner, segment| {
        let mut mapping = Mapping::new();
        mapping.insert(Value::String(segment.to_string()), inner);
        Value::Mapping(mapping)
    });
    // Round-trip through text so the shape check reports the key path like a file would.
    let text = serde_norway::to_string(&nested).expect("a YAML value serialises");
    serde_norway::from_str::<FileShape>(&text).map_err(|e| shape_error(&origin, &e, false))?;
    drop_null_sections(&mut nested, &skeleton());
    Ok(Layer {
        origin,
        value: nested,
        lines: HashMap::new(),
    })
}

/// Merges the layers, deserialises the result and checks its values; `job` is the index of
/// the job file's layer, blamed for problems with defaults nobody set.
fn spec_from_layers(layers: &[Layer], job: usize) -> Result<JobSpec> {
    let mut merged = Value::Mapping(Mapping::new());
    for layer in layers {
        merge(&mut merged, layer.value.clone());
    }
    let spec: JobSpec = serde_norway::from_value(merged).map_err(|e| {
        job_error(
            &layers[job].origin,
            None,
            None,
            format!("the merged job and recipes do not form a job spec: {e}"),
        )
    })?;
    match spec.first_problem() {
        Some((key, reason)) => Err(blame(layers, job, &key, reason)),
        None => Ok(spec),
    }
}

/// Deep merge: mappings merge key by key, anything else in `overlay` replaces `base`.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(base), Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// The default spec as a value: shows which keys are sections (mappings).
fn skeleton() -> Value {
    let mut skeleton =
        serde_norway::to_value(JobSpec::default()).expect("the default spec serialises");
    // `eval` is left out of a spec's YAML while off; it is a section all the same.
    if let Value::Mapping(sections) = &mut skeleton {
        let eval = serde_norway::to_value(EvalSpec::default()).expect("serialises");
        sections.insert(Value::from("eval"), eval);
    }
    skeleton
}

/// An empty section (`model:` with nothing under it) means "nothing set here", not "null";
/// nulls stay where they mean `None` (`text_encoder.weights: null`, `data.prepare: null`).
fn drop_null_sections(value: &mut Value, skeleton: &Value) {
    let (Value::Mapping(mapping), Value::Mapping(sections)) = (value, skeleton) else {
        return;
    };
    mapping.retain(|key, child| {
        !(child.is_null() && sections.get(key).is_some_and(Value::is_mapping))
    });
    for (key, child) in mapping.iter_mut() {
        if let Some(section) = sections.get(key) {
            drop_null_sections(child, section);
        }
    }
}

/// The error for an impossible value at `key`, naming the last layer that set it (or the
/// job file when it is a default) and the line of the key or its nearest enclosing section.
fn blame(layers: &[Layer], job: usize, key: &str, reason: String) -> Error {
    let segments: Vec<&str> = key.split('.').collect();
    match layers
        .iter()
        .rev()
        .find(|layer| lookup(&layer.value, &segments).is_some())
    {
        Some(layer) => job_error(&layer.origin, line_of(layer, &segments), Some(key), reason),
        None => {
            let layer = &layers[job];
            let reason = format!("{reason} (not set by the job or its recipes)");
            job_error(&layer.origin, line_of(layer, &segments), Some(key), reason)
        }
    }
}

fn lookup<'v>(value: &'v Value, segments: &[&str]) -> Option<&'v Value> {
    segments
        .iter()
        .try_fold(value, |node, segment| node.as_mapping()?.get(*segment))
}

fn line_of(layer: &Layer, segments: &[&str]) -> Option<usize> {
    (1..=segments.len())
        .rev()
        .find_map(|n| layer.lines.get(&segments[..n].join(".")).copied())
}

/// Turns serde_norway's "path: message at line L column C" into key path, line and message.
/// An unknown field is reported at its own path (`train.lrr`), not at its parent's.
fn shape_error(origin: &str, error: &serde_norway::Error, with_line: bool) -> Error {
    let location = error.location();
    let mut text = error.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = stripped.to_string();
        }
    }
    let (path, message) = match text.split_once(": ") {
        Some((path, message)) if !path.is_empty() && !path.contains(char::is_whitespace) => {
            (Some(path.to_string()), message.to_string())
        }
        _ => (None, text.clone()),
    };
    let (key, message) = match unknown_field(&message) {
        Some((field, rest)) => {
            let key = path.map_or(field.to_string(), |parent| format!("{parent}.{field}"));
            (Some(key), format!("unknown key{rest}"))
        }
        None => (path, message),
    };
    let line = if with_line {
        location.map(|l| l.line())
    } else {
        None
    };
    job_error(origin, line, key.as_deref(), message)
}

/// "unknown field `x`, expected ..." → ("x", ", expected ...").
fn unknown_field(message: &str) -> Option<(&str, &str)> {
    message.strip_prefix("unknown field `")?.split_once('`')
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn job_error(file: &str, line: Option<usize>, key: Option<&str>, message: String) -> Error {
    Error::Job {
        file: file.to_string(),
        line,
        key: key.map(str::to_string),
        message,
    }
}

/// Lexically resolves `.` and `..` so recipe paths print (and compare) as the file they name.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                let can_pop = matches!(out.components().next_back(), Some(Component::Normal(_)));
                if can_pop {
                    out.pop();
                } else if !matches!(out.components().next_back(), Some(Component::RootDir)) {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A location from a job (a URL, or a path relative to the working directory) as the canonical
/// URL a [`Location`](crate::storage::Location) opens: paths become absolute `file://` URLs.
pub use crate::storage::location_url;
