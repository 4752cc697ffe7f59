//! `spotrun-bench`: runs the cache throughput benchmark; `--quick` prints the table, `--full` also
//! writes `BENCHMARKS.md` and its SVG plots.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use spotrun_benches::{Options, report};

const FULL_COMMAND: &str = "eval \"$(bash .ci/install)\" && cargo build --release --bins && \
                            cargo build --profile dist --target $(uname -m)-unknown-linux-musl \
                            -p spotrun-executor -p spotrun-cache-proxy -p spotrun-launch && \
                            cargo run --release -p spotrun-benches --bin spotrun-bench -- --full";

#[derive(Debug, Parser)]
#[command(
    name = "spotrun-bench",
    about = "spotrun cache and executor benchmarks (issue 7)"
)]
struct Cli {
    /// Small sizes, print the table (the default).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Issue 7 sizes; write BENCHMARKS.md and plots to --out.
    #[arg(long)]
    full: bool,
    /// Where BENCHMARKS.md goes (plots go to OUT/benches/plots).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    out: PathBuf,
    /// P1/P3 object sizes in MiB, comma separated.
    #[arg(long, value_delimiter = ',')]
    sizes_mib: Option<Vec<u64>>,
    /// Objects per size.
    #[arg(long)]
    reps: Option<u32>,
    /// P7 single streaming PUT size in MiB.
    #[arg(long)]
    big_mib: Option<u64>,
    /// P7 concurrent PUTs.
    #[arg(long)]
    concurrent: Option<usize>,
    /// P7 size of each concurrent PUT in MiB.
    #[arg(long)]
    concurrent_mib: Option<u64>,
    /// P5/P6 files in the generated tree.
    #[arg(long)]
    tree_files: Option<usize>,
    /// P8/P9 jobs.
    #[arg(long)]
    jobs: Option<u32>,
    /// P1w-P3w object size in MiB over the shaped remote link.
    #[arg(long)]
    remote_mib: Option<u64>,
    /// S1 1 KiB PUTs timed per store size.
    #[arg(long)]
    tiny_puts: Option<u32>,
    /// S1 chunks stored between the two series.
    #[arg(long)]
    fill_chunks: Option<usize>,
    /// S2 keys stored for the two restart series: FEW,MANY.
    #[arg(long, value_delimiter = ',')]
    restart_keys: Option<Vec<u32>>,
    /// S3 entries of the context zip and the measured one: SMALL,LARGE.
    #[arg(long, value_delimiter = ',')]
    rss_entries: Option<Vec<usize>>,
    /// Run only these groups: cpu (P4), transfer (P1-P3, P10), storage (P5, P6), memory (P7),
    /// executor (P8, P9), remote (P1w-P3w), scale (S1-S3). Prints the table; never writes
    /// BENCHMARKS.md (with --full: at its sizes).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut opts = if cli.full {
        Options::full()
    } else {
        Options::quick()
    };
    if let Some(v) = cli.sizes_mib {
        opts.sizes_mib = v;
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = cli.$f { opts.$f = v; } )* };
    }
    set!(
        reps,
        big_mib,
        concurrent,
        concurrent_mib,
        tree_files,
        jobs,
        remote_mib,
        tiny_puts,
        fill_chunks
    );
    if let Some(v) = cli.restart_keys {
        let &[few, many] = v.as_slice() else {
            return usage("--restart-keys takes two numbers: FEW,MANY");
        };
        opts.restart_keys = (few, many);
    }
    if let Some(v) = cli.rss_entries {
        let &[small, large] = v.as_slice() else {
            return usage("--rss-entries takes two numbers: SMALL,LARGE");
        };
        opts.rss_entries = (small, large);
    }
    opts.only = cli.only;
    eprintln!("sizes: {}", opts.describe());
    let report = match spotrun_benches::run(&opts, &|line| eprintln!("{line}")).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spotrun-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let machine = report::machine_line();
    println!("{machine}\n\n{}", report.table());
    if cli.full && opts.only.is_empty() {
        if let Err(e) = write_full(&cli.out, &report, &machine, &opts) {
            eprintln!("spotrun-bench: writing the report: {e:#}");
            return ExitCode::FAILURE;
        }
        println!("wrote {}", cli.out.join("BENCHMARKS.md").display());
    }
    ExitCode::SUCCESS
}

fn usage(message: &str) -> ExitCode {
    eprintln!("spotrun-bench: {message}");
    ExitCode::FAILURE
}

fn write_full(
    out: &std::path::Path,
    report: &spotrun_benches::Report,
    machine: &str,
    opts: &Options,
) -> std::io::Result<()> {
    let plots = out.join("benches").join("plots");
    std::fs::create_dir_all(&plots)?;
    for p in &report.plots {
        std::fs::write(plots.join(p.file), report::svg(p))?;
    }
    let notes = std::fs::read_to_string(out.join("benches").join("NOTES.md")).unwrap_or_default();
    let md = report.markdown(
        machine,
        FULL_COMMAND,
        &opts.describe(),
        "benches/plots",
        &notes,
    );
    std::fs::write(out.join("BENCHMARKS.md"), md)
}
