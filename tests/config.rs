//! Job specs and recipes: the shipped files load and validate, the built-in quickstart is
//! `jobs/quickstart.yaml`, `--set` overrides, and every kind of bad input is rejected with the
//! file, the key path and the line.

use std::path::{Path, PathBuf};

use ditrun::config::{load_job, location_url, DatasetKind, JobSpec, Split, QUICKSTART_JOB};
use ditrun::flow::Sampler;
use ditrun::model::TextDiTConfig;
use ditrun::Error;
use serde_norway::Value;

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn yaml_files(folder: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(folder))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

fn sets(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// A job that is valid on its own, to which a test appends one bad piece.
const MINIMAL_JOB: &str = "data:\n  shards: memory://config-test/shards\n";

/// The error of loading `path` with `overrides`, as its message and its structured parts.
fn load_error(path: &Path, overrides: &[&str]) -> (String, String, Option<usize>, Option<String>) {
    match load_job(Some(path), &sets(overrides)) {
        Ok(spec) => panic!(
            "{} loaded although it is bad:\n{}",
            path.display(),
            spec.to_yaml()
        ),
        Err(error) => {
            let message = error.to_string();
            match error {
                Error::Job {
                    file, line, key, ..
                } => (message, file, line, key),
                other => panic!("expected Error::Job, got {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shipped files
// ---------------------------------------------------------------------------------------------

#[test]
fn every_shipped_job_loads_and_builds_valid_model_configs() {
    let jobs = yaml_files("jobs");
    assert!(jobs.len() >= 3, "expected at least 3 jobs, found {jobs:?}");
    for job in jobs {
        let spec = load_job(Some(&job), &[]).unwrap_or_else(|e| panic!("{}: {e}", job.display()));
        spec.validate().unwrap();
        spec.dit_config()
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", job.display()));
        assert_eq!(
            spec.dit_config().context_dim,
            spec.clip_config().hidden_size
        );
        assert!(
            spec.data.prepare.is_some(),
            "{} should prepare its shards",
            job.display()
        );
    }
}

/// Each recipe, named by a job that adds only the shard location, loads, and every value the
/// recipe sets is the value in the loaded spec.
#[test]
fn every_recipe_loads_and_its_values_reach_the_spec() {
    let recipes = yaml_files("configs");
    assert!(
        recipes.len() >= 5,
        "expected at least 5 recipes, found {recipes:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for recipe in recipes {
        let job = write(
            dir.path(),
            "job.yaml",
            &format!("recipe: {}\n{MINIMAL_JOB}", recipe.display()),
        );
        let spec =
            load_job(Some(&job), &[]).unwrap_or_else(|e| panic!("{}: {e}", recipe.display()));
        let loaded = serde_norway::to_value(&spec).unwrap();
        let written: Value =
            serde_norway::from_str(&std::fs::read_to_string(&recipe).unwrap()).unwrap();
        let mut leaves = Vec::new();
        collect_leaves(&written, String::new(), &mut leaves);
        assert!(!leaves.is_empty(), "{} sets nothing", recipe.display());
        for (key, value) in leaves {
            let got = key.split('.').try_fold(&loaded, |node, k| node.get(k));
            assert_eq!(got, Some(&value), "{}: {key}", recipe.display());
        }
    }
}

fn collect_leaves(value: &Value, prefix: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Mapping(mapping) => {
            for (key, child) in mapping {
                let key = key.as_str().unwrap();
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                collect_leaves(child, path, out);
            }
        }
        leaf => out.push((prefix, leaf.clone())),
    }
}

#[test]
fn cifar10_job_is_the_seeds_run() {
    let spec = load_job(Some(&repo("jobs/cifar10-text-dit.yaml")), &[]).unwrap();
    assert_eq!(spec.dit_config(), TextDiTConfig::new(), "the seed's model");
    assert_eq!(
        spec.text_encoder.weights.as_deref(),
        Some("hf://openai/clip-vit-base-patch32")
    );
    assert_eq!(
        spec.clip_config(),
        ditrun::model::ClipTextConfig::new(),
        "ViT-B/32"
    );
    assert_eq!(
        (
            spec.train.batch_size,
            spec.train.lr,
            spec.train.weight_decay,
            spec.train.text_drop_prob
        ),
        (64, 1e-4, 0.01, 0.1)
    );
    assert_eq!(
        (spec.sample.cfg, spec.sample.steps, spec.sample.sampler),
        (7.5, 50, Sampler::Euler)
    );
    assert_eq!(
        spec.data.prepare.as_ref().unwrap().dataset,
        DatasetKind::Cifar10
    );
    assert!(spec
        .sample
        .prompts
        .contains(&"a photo of an airplane".to_string()));
}

#[test]
fn fashion_mnist_job_reads_debians_files_in_one_channel() {
    let spec = load_job(Some(&repo("jobs/fashion-mnist.yaml")), &[]).unwrap();
    let prepare = spec.data.prepare.as_ref().unwrap();
    assert_eq!(prepare.dataset, DatasetKind::FashionMnist);
    assert_eq!(
        prepare.source.as_deref(),
        Some("/usr/share/datasets/fashion-mnist")
    );
    assert_eq!(prepare.split, Split::Train);
    assert_eq!((spec.model.channels, spec.model.image_size), (1, 32));
}

#[test]
fn quickstart_needs_no_network_and_writes_under_runs_quickstart() {
    let spec = load_job(None, &[]).unwrap();
    assert_eq!(spec.text_encoder.weights, None);
    assert_eq!(
        spec.data.prepare.as_ref().unwrap().dataset,
        DatasetKind::Synthetic
    );
    for location in [
        &spec.data.shards,
        &spec.checkpoint.url,
        &spec.logging.dir,
        spec.sample.dir.as_ref().unwrap(),
    ] {
        assert!(location.starts_with("runs/quickstart/"), "{location}");
    }
    assert!(spec.sample.enabled() && !spec.sample.prompts.is_empty());
}

#[test]
fn builtin_quickstart_equals_jobs_quickstart_yaml() {
    let builtin = load_job(None, &[]).unwrap();
    let from_file = load_job(Some(&repo(QUICKSTART_JOB)), &[]).unwrap();
    assert_eq!(builtin, from_file);
    assert_eq!(builtin.hash(), from_file.hash());
    assert_eq!(builtin.to_yaml(), from_file.to_yaml());
}

// ---------------------------------------------------------------------------------------------
// Merging, overrides, hashing
// ---------------------------------------------------------------------------------------------

#[test]
fn recipes_merge_deeply_under_the_job_and_later_recipes_win() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "configs/a.yaml",
        "model:\n  dim: 64\n  heads: 4\n  depth: 2\ntrain:\n  lr: 0.5\n",
    );
    write(dir.path(), "configs/b.yaml", "model:\n  depth: 3\n");
    let job = write(
        dir.path(),
        "jobs/job.yaml",
        &format!(
            "recipe: [../configs/a.yaml, ../configs/b.yaml]\nmodel:\n  heads: 8\n{MINIMAL_JOB}"
        ),
    );
    let spec = load_job(Some(&job), &[]).unwrap();
    assert_eq!(
        (spec.model.dim, spec.model.heads, spec.model.depth),
        (64, 8, 3)
    );
    assert_eq!(spec.train.lr, 0.5);
    assert_eq!(
        spec.model.patch_size,
        TextDiTConfig::new().patch_size,
        "untouched keys keep defaults"
    );
}

#[test]
fn a_job_can_null_a_recipes_weights_and_empty_sections_mean_nothing_set() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "clip.yaml",
        "text_encoder:\n  weights: hf://openai/clip-vit-base-patch32\n",
    );
    let job = write(
        dir.path(),
        "job.yaml",
        &format!("recipe: clip.yaml\ntext_encoder:\n  weights: null\nmodel:\n{MINIMAL_JOB}"),
    );
    let spec = load_job(Some(&job), &[]).unwrap();
    assert_eq!(spec.text_encoder.weights, None);
    assert_eq!(spec.model, JobSpec::default().model);
}

#[test]
fn set_overrides_change_values_and_hash() {
    let base = load_job(None, &[]).unwrap();
    let changed = load_job(
        None,
        &sets(&[
            "train.lr=3e-4",
            r#"sample.prompts=["a","b"]"#,
            "train.steps=7",
        ]),
    )
    .unwrap();
    assert_eq!(changed.train.lr, 3e-4);
    assert_eq!(
        changed.sample.prompts,
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(changed.train.steps, 7);
    assert_ne!(base.hash(), changed.hash());
    assert!(
        changed.to_yaml().contains("lr: 0.0003"),
        "{}",
        changed.to_yaml()
    );

    let weights = load_job(
        None,
        &sets(&["text_encoder.weights=hf://openai/clip-vit-base-patch32"]),
    )
    .unwrap();
    assert_eq!(
        weights.text_encoder.weights.as_deref(),
        Some("hf://openai/clip-vit-base-patch32")
    );
    let back = load_job(
        None,
        &sets(&["text_encoder.weights=hf://x/y", "text_encoder.weights=null"]),
    )
    .unwrap();
    assert_eq!(back, base, "the last --set wins");

    // Setting a value to what it already is changes nothing, hash included.
    let same = load_job(None, &sets(&[&format!("train.steps={}", base.train.steps)])).unwrap();
    assert_eq!(same.hash(), base.hash());
    // Any single change moves the hash, even in a key that does not affect the maths.
    let prefetch = load_job(
        None,
        &sets(&[&format!("data.prefetch={}", base.data.prefetch + 1)]),
    )
    .unwrap();
    assert_ne!(prefetch.hash(), base.hash());
}

#[test]
fn effective_yaml_loads_back_to_an_equal_spec() {
    let spec = load_job(
        Some(&repo("jobs/cifar10-text-dit.yaml")),
        &sets(&["train.lr=2e-4"]),
    )
    .unwrap();
    let again = JobSpec::from_yaml(&spec.to_yaml(), "effective config").unwrap();
    assert_eq!(again, spec);
    assert_eq!(again.hash(), spec.hash());
    assert_eq!(spec.hash().len(), 64);
}

#[test]
fn every_steps_zero_turns_periodic_actions_off() {
    let spec = load_job(
        None,
        &sets(&[
            "checkpoint.every_steps=0",
            "logging.every_steps=0",
            "sample.every_steps=0",
            "sample.at_end=false",
            "sample.prompts=[]",
        ]),
    )
    .unwrap();
    assert_eq!(
        (spec.checkpoint.every_steps, spec.logging.every_steps),
        (0, 0)
    );
    assert!(!spec.sample.enabled());
}

#[test]
fn relative_locations_are_relative_to_the_working_directory() {
    let cwd = std::env::current_dir().unwrap();
    let url = location_url("runs/quickstart/checkpoints").unwrap();
    let expected = url::Url::from_file_path(cwd.join("runs/quickstart/checkpoints")).unwrap();
    assert_eq!(url, expected.as_str());
    assert_eq!(
        location_url("s3://bucket/ckpt").unwrap(),
        "s3://bucket/ckpt"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input: each names the file, the key path and the line
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_yaml_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "bad.yaml",
        "data:\n  shards: x\ntrain:\n  lr: [1e-4\n  steps: 3\n",
    );
    let (message, file, line, _) = load_error(&job, &[]);
    assert_eq!(file, job.display().to_string(), "{message}");
    assert!(line.is_some(), "{message}");
    assert!(
        message.contains("bad.yaml") && message.contains("malformed YAML"),
        "{message}"
    );
}

#[test]
fn unknown_key_names_its_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "job.yaml",
        &format!("{MINIMAL_JOB}train:\n  steps: 10\n  lrr: 0.1\n"),
    );
    let (message, file, line, key) = load_error(&job, &[]);
    assert_eq!(
        (file.as_str(), line, key.as_deref()),
        (job.to_str().unwrap(), Some(5), Some("train.lrr")),
        "{message}"
    );
    assert!(
        message.contains("line 5")
            && message.contains("train.lrr")
            && message.contains("unknown key"),
        "{message}"
    );
    assert!(message.contains("`lr`"), "lists the known keys: {message}");

    let section = write(
        dir.path(),
        "section.yaml",
        &format!("{MINIMAL_JOB}trian:\n  lr: 0.1\n"),
    );
    let (message, _, line, key) = load_error(&section, &[]);
    assert_eq!(
        (line, key.as_deref()),
        (Some(3), Some("trian")),
        "{message}"
    );
}

#[test]
fn wrong_type_names_its_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "job.yaml",
        &format!("{MINIMAL_JOB}train:\n  lr: fast\n"),
    );
    let (message, file, line, key) = load_error(&job, &[]);
    assert_eq!(
        (file.as_str(), line, key.as_deref()),
        (job.to_str().unwrap(), Some(4), Some("train.lr")),
        "{message}"
    );
    assert!(message.contains("invalid type"), "{message}");

    let variant = write(
        dir.path(),
        "variant.yaml",
        &format!("{MINIMAL_JOB}sample:\n  sampler: rk4\n"),
    );
    let (message, _, line, key) = load_error(&variant, &[]);
    assert_eq!(
        (line, key.as_deref()),
        (Some(4), Some("sample.sampler")),
        "{message}"
    );
    assert!(message.contains("euler"), "{message}");

    let top = write(dir.path(), "list.yaml", "- model\n- train\n");
    let (message, _, _, _) = load_error(&top, &[]);
    assert!(message.contains("expected a mapping"), "{message}");
}

#[test]
fn impossible_values_name_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, usize)] = &[
        (
            "model:\n  image_size: 32\n  patch_size: 5\n",
            "model.patch_size",
            5,
        ),
        ("model:\n  dim: 128\n  heads: 3\n", "model.heads", 5),
        ("train:\n  lr: -1.0e-4\n", "train.lr", 4),
        ("train:\n  lr: 0\n", "train.lr", 4),
        ("train:\n  batch_size: 0\n", "train.batch_size", 4),
        ("train:\n  text_drop_prob: 1.5\n", "train.text_drop_prob", 4),
        ("sample:\n  cfg: -1\n", "sample.cfg", 4),
        ("sample:\n  steps: 0\n", "sample.steps", 4),
        (
            "sample:\n  every_steps: 10\n  prompts: []\n",
            "sample.prompts",
            5,
        ),
        (
            "checkpoint:\n  url: memory://c\n  keep_last: 0\n",
            "checkpoint.keep_last",
            5,
        ),
        ("checkpoint:\n  url: ftp://host/c\n", "checkpoint.url", 4),
        // Evaluations are off in MINIMAL_JOB: there is nothing to rank checkpoints by.
        (
            "checkpoint:\n  url: memory://c\n  keep_best: fid\n",
            "checkpoint.keep_best",
            5,
        ),
        ("model:\n  context_dim: 256\n", "model.context_dim", 4),
        // These replace MINIMAL_JOB's data section rather than follow it.
        (
            "prepare:\n    dataset: fashion-mnist\n",
            "model.channels",
            0,
        ),
        (
            "prepare:\n    dataset: synthetic\n    source: /tmp/x\n",
            "data.prepare.source",
            5,
        ),
        (
            "prepare:\n    samples_per_shard: 0\n",
            "data.prepare.samples_per_shard",
            4,
        ),
    ];
    for (i, (piece, key_path, line)) in cases.iter().enumerate() {
        let text = match piece.starts_with("prepare") {
            true => format!("{MINIMAL_JOB}  {piece}"),
            false => format!("{MINIMAL_JOB}{piece}"),
        };
        let job = write(dir.path(), &format!("case{i}.yaml"), &text);
        let (message, file, got_line, key) = load_error(&job, &[]);
        assert_eq!(file, job.display().to_string(), "{message}");
        assert_eq!(key.as_deref(), Some(*key_path), "{message}");
        assert!(
            message.contains(key_path) && message.contains(&format!("case{i}.yaml")),
            "{message}"
        );
        // A value the file did not write (the default channels) has no line to point at.
        let expected_line = (*line > 0).then_some(*line);
        assert_eq!(got_line, expected_line, "{message}");
    }
}

#[test]
fn a_bad_value_in_a_recipe_names_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write(
        dir.path(),
        "configs/model.yaml",
        "# sizes\nmodel:\n  dim: 100\n  heads: 8\n",
    );
    let job = write(
        dir.path(),
        "jobs/job.yaml",
        &format!("recipe: ../configs/model.yaml\n{MINIMAL_JOB}"),
    );
    let (message, file, line, key) = load_error(&job, &[]);
    assert_eq!(Path::new(&file), recipe, "{message}");
    assert_eq!(
        (line, key.as_deref()),
        (Some(4), Some("model.heads")),
        "{message}"
    );

    // The job overriding the value takes the blame instead.
    let job = write(
        dir.path(),
        "jobs/job2.yaml",
        &format!("recipe: ../configs/model.yaml\nmodel:\n  dim: 96\n  heads: 5\n{MINIMAL_JOB}"),
    );
    let (message, file, line, _) = load_error(&job, &[]);
    assert_eq!(
        (Path::new(&file), line),
        (job.as_path(), Some(4)),
        "{message}"
    );

    let typo = write(dir.path(), "configs/typo.yaml", "train:\n  warmup: 10\n");
    let job = write(
        dir.path(),
        "jobs/job3.yaml",
        &format!("recipe: ../configs/typo.yaml\n{MINIMAL_JOB}"),
    );
    let (message, file, line, key) = load_error(&job, &[]);
    assert_eq!(
        (Path::new(&file), line, key.as_deref()),
        (typo.as_path(), Some(2), Some("train.warmup")),
        "{message}"
    );
}

#[test]
fn a_bad_value_from_set_names_the_override() {
    let (message, file, line, key) = load_error(Path::new(&repo(QUICKSTART_JOB)), &["train.lr=-1"]);
    assert_eq!(
        (file.as_str(), line, key.as_deref()),
        ("--set train.lr=-1", None, Some("train.lr")),
        "{message}"
    );

    let (message, file, _, key) = load_error(&repo(QUICKSTART_JOB), &["train.steps=many"]);
    assert_eq!(
        (file.as_str(), key.as_deref()),
        ("--set train.steps=many", Some("train.steps")),
        "{message}"
    );
    assert!(message.contains("invalid type"), "{message}");
}

#[test]
fn unknown_set_path_is_an_error_naming_it() {
    for (set, key) in [
        ("train.lrr=1", "train.lrr"),
        ("optimizer.lr=1", "optimizer"),
        ("model.dim.x=1", "model.dim"),
    ] {
        let error = load_job(None, &sets(&[set])).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&format!("--set {set}")) && message.contains(key),
            "{message}"
        );
    }
    for malformed in ["train.lr", "train..lr=1", "recipe=x.yaml"] {
        let message = load_job(None, &sets(&[malformed])).unwrap_err().to_string();
        assert!(message.contains(&format!("--set {malformed}")), "{message}");
    }
}

#[test]
fn missing_recipe_names_the_job_the_recipe_key_and_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "jobs/job.yaml",
        &format!("{MINIMAL_JOB}recipe:\n  - ../configs/nope.yaml\n"),
    );
    let (message, file, line, key) = load_error(&job, &[]);
    assert_eq!(
        (Path::new(&file), line, key.as_deref()),
        (job.as_path(), Some(3), Some("recipe")),
        "{message}"
    );
    assert!(message.contains("../configs/nope.yaml"), "{message}");
    assert!(
        message.contains(&dir.path().join("configs/nope.yaml").display().to_string()),
        "{message}"
    );
}

#[test]
fn missing_job_file_and_recipe_cycles_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.yaml");
    let (message, file, _, _) = load_error(&missing, &[]);
    assert_eq!(Path::new(&file), missing, "{message}");

    write(dir.path(), "a.yaml", "recipe: b.yaml\n");
    write(dir.path(), "b.yaml", "recipe: a.yaml\n");
    let job = write(
        dir.path(),
        "job.yaml",
        &format!("recipe: a.yaml\n{MINIMAL_JOB}"),
    );
    let (message, _, _, key) = load_error(&job, &[]);
    assert_eq!(key.as_deref(), Some("recipe"), "{message}");
    assert!(message.contains("a.yaml"), "{message}");
}
