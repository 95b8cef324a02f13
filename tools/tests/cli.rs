//! The `strata` binary end to end: build, inspect, eval with JSON whose per-query attended
//! lists let anyone recompute the metrics, and clear errors for bad input.

use std::process::Command;

use strata_tests::shared_dump;

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run strata");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "strata failed: {text}");
    text
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run strata");
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "strata should have failed");
    assert!(
        !text.contains("panicked"),
        "panic instead of an error: {text}"
    );
    text
}

#[test]
fn build_inspect_eval_and_recompute_metrics() {
    let Some(dump) = shared_dump("smollm2-jargon-8k.safetensors") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("idx");
    let text = run_ok(strata().arg("build").arg(&dump).arg("--out").arg(&index));
    assert!(text.contains("built") && text.contains("lists"), "{text}");
    let text = run_ok(strata().arg("inspect").arg(&index).arg("--verify"));
    assert!(
        text.contains("list_size") && text.contains("verified"),
        "{text}"
    );

    let json = tmp.path().join("eval.json");
    let text = run_ok(
        strata()
            .arg("eval")
            .arg(&dump)
            .arg("--index")
            .arg(&index)
            .args([
                "--budget",
                "0.02",
                "--method",
                "strata",
                "--query-stride",
                "32",
            ])
            .arg("--json")
            .arg(&json),
    );
    assert!(text.contains("R@100"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let s = &v["summary"];
    for key in [
        "recall@10",
        "recall@100",
        "covered_mass",
        "output_error",
        "attended_fraction",
        "scored_fraction",
        "ssd_bytes_per_query",
        "ssd_reads_per_query",
        "search_us_p50",
        "search_us_p99",
    ] {
        assert!(s[key].is_number(), "summary lacks {key}");
    }
    assert!(s["recall@100"].as_f64().unwrap() > 0.9);
    assert!(s["attended_fraction"].as_f64().unwrap() <= 0.02);
    assert_eq!(v["per_layer"].as_array().unwrap().len(), 5);

    // Recompute recall@100 of a few queries from the attended lists and the dump alone.
    let d = strata_storage::kvdump::KvDump::open(&dump).unwrap();
    let queries = v["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 5 * 9 * 8);
    let mut recomputed = 0.0;
    for rec in queries.iter().take(20) {
        let (l, h, qi) = (
            rec["layer"].as_u64().unwrap() as usize,
            rec["head"].as_u64().unwrap() as usize,
            rec["query"].as_u64().unwrap() as usize,
        );
        let p = rec["position"].as_u64().unwrap() as usize;
        assert_eq!(p, d.query_positions[qi]);
        let attended: std::collections::HashSet<u64> = rec["attended"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert!(attended.iter().all(|&t| t as usize <= p));
        let dim = d.meta.head_dim;
        let keys = d.keys.slice2(l, d.kv_head_of(h));
        let q = d.queries.row(l, h, qi);
        let mut scores: Vec<(f32, u64)> = (0..=p)
            .map(|t| {
                let k = &keys[t * dim..(t + 1) * dim];
                (k.iter().zip(q).map(|(a, b)| a * b).sum(), t as u64)
            })
            .collect();
        scores.sort_by(|a, b| b.0.total_cmp(&a.0));
        let hit = scores
            .iter()
            .take(100)
            .filter(|s| attended.contains(&s.1))
            .count();
        recomputed += hit as f64 / 100.0;
    }
    let per_query = recomputed / 20.0;
    assert!(per_query > 0.9, "recomputed recall@100 {per_query}");
}

#[test]
fn bad_input_gives_errors_that_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    // Not a dump.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not safetensors").unwrap();
    let e = run_err(
        strata()
            .arg("build")
            .arg(&junk)
            .arg("--out")
            .arg(tmp.path().join("x")),
    );
    assert!(e.contains("junk.safetensors"), "{e}");
    // Missing file.
    let e = run_err(
        strata()
            .arg("build")
            .arg(tmp.path().join("nope.safetensors"))
            .arg("--out")
            .arg(tmp.path().join("y")),
    );
    assert!(e.contains("nope.safetensors"), "{e}");
    // Unknown build parameter.
    let Some(dump) = shared_dump("smollm2-jargon-8k.safetensors") else {
        return;
    };
    let e = run_err(
        strata()
            .arg("build")
            .arg(&dump)
            .arg("--out")
            .arg(tmp.path().join("z"))
            .args(["--set", "no_such_knob=3"]),
    );
    assert!(e.contains("no_such_knob"), "{e}");
    assert!(!tmp.path().join("z").exists());
    // Budget outside (0, 1].
    let e = run_err(
        strata()
            .arg("eval")
            .arg(&dump)
            .args(["--method", "oracle", "--budget", "1.5"]),
    );
    assert!(e.contains("budget"), "{e}");
    // The budget given twice, and an engine parameter eval does not use.
    let e = run_err(strata().arg("eval").arg(&dump).args([
        "--method",
        "oracle",
        "--budget",
        "0.02",
        "--set",
        "budget=0.03",
    ]));
    assert!(e.contains("both given"), "{e}");
    let e = run_err(strata().arg("eval").arg(&dump).args([
        "--method",
        "oracle",
        "--set",
        "ram_budget_bytes=1000",
    ]));
    assert!(
        e.contains("ram_budget_bytes") && e.contains("eval uses no engine parameter"),
        "{e}"
    );
    // Index that is not an index.
    let e = run_err(
        strata()
            .arg("eval")
            .arg(&dump)
            .arg("--index")
            .arg(tmp.path())
            .args(["--method", "strata"]),
    );
    assert!(e.contains("index.strata"), "{e}");
}
