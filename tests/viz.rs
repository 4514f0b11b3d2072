//! Pictures of what the model learned: the caption-similarity matrix and its heat map.

mod common;

use std::process::Command;

use ditrun::model::ClipTextConfig;
use ditrun::text::TextEncoder;
use ditrun::viz::{caption_similarity, render_similarity, similarity_canvas_size, SimilarityReport};

use common::TestBackend;

fn tiny_encoder() -> TextEncoder<TestBackend> {
    let config = ClipTextConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        ..ClipTextConfig::new()
    };
    TextEncoder::load(None, &config, 5, &Default::default()).unwrap()
}

fn prompts() -> Vec<String> {
    ["a photo of a red circle", "a photo of a blue square", "a photo of a cat", "a photo of a red circle"]
        .map(String::from)
        .to_vec()
}

#[test]
fn the_similarity_matrix_is_symmetric_with_ones_on_the_diagonal() {
    let matrix = caption_similarity(&tiny_encoder(), &prompts());
    assert_eq!(matrix.len(), 4);
    for i in 0..4 {
        assert_eq!(matrix[i].len(), 4);
        assert_eq!(matrix[i][i], 1.0);
        for j in 0..4 {
            assert_eq!(matrix[i][j], matrix[j][i], "symmetric at ({i}, {j})");
            assert!((-1.0..=1.0).contains(&matrix[i][j]));
        }
    }
    assert!((matrix[0][3] - 1.0).abs() < 1e-12, "identical prompts: {}", matrix[0][3]);
    assert!(matrix[0][1] < 1.0 - 1e-6, "different prompts differ: {}", matrix[0][1]);
}

#[test]
fn the_heat_map_decodes_at_its_documented_size_and_is_not_blank() {
    let prompts = prompts();
    let report = SimilarityReport {
        matrix: caption_similarity(&tiny_encoder(), &prompts),
        prompts,
        encoder: "random initialisation, seed 5".into(),
    };
    let canvas = render_similarity(&report);
    assert!(!canvas.is_blank());
    let png = canvas.to_png().unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width as usize, info.height as usize), similarity_canvas_size(&report));
    assert_eq!((canvas.width, canvas.height), similarity_canvas_size(&report));
    // Four 96-pixel cells per row and per column fit inside it.
    assert!(canvas.width > 4 * 96 && canvas.height > 4 * 96);
}

#[test]
fn inspect_similarity_prints_the_matrix_as_json_and_writes_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "name: sim\nmodel: { context_dim: 32 }\ntext_encoder: { hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }\ndata: { shards: unused }\n",
    )
    .unwrap();
    let png = dir.path().join("similarity.png");
    let output = Command::new(env!("CARGO_BIN_EXE_ditrun"))
        .args(["inspect", "similarity", "--job"])
        .arg(&job)
        .args(["--prompt", "a photo of a dog", "--prompt", "a photo of a cat", "--json", "--out"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["prompts"], serde_json::json!(["a photo of a dog", "a photo of a cat"]));
    assert_eq!(report["matrix"][0][0], 1.0);
    assert_eq!(report["matrix"][0][1], report["matrix"][1][0]);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}
