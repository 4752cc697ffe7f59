//! The benchmark's quick mode as CI runs it: every figure is produced and finite, every GET read back
//! byte-identical (checked inside the run), the remote-backend and scale groups included at their
//! quick sizes. Never asserts on the numbers themselves.

use spotrun_benches::{Options, report};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_produces_every_figure() {
    let opts = Options::quick();
    let report = spotrun_benches::run(&opts, &|line| eprintln!("{line}"))
        .await
        .expect("the quick benchmark runs without errors");
    println!("{}\n\n{}", report::machine_line(), report.table());
    for id in [
        "P1", "P1w", "P2", "P2w", "P3", "P3r", "P3w", "P4", "P5", "P5i", "P6", "P7", "P7c", "P8",
        "P9", "P10", "S1", "S2", "S3",
    ] {
        let row = report.row(id).unwrap_or_else(|| panic!("row {id} missing"));
        assert!(
            row.value.is_finite() && row.value > 0.0,
            "{id} is not a positive finite number: {}",
            row.value
        );
    }
    assert_eq!(report.plots.len(), 2);
    for p in &report.plots {
        let svg = report::svg(p);
        assert!(svg.contains("<polyline"), "{} has no lines", p.file);
    }
}
