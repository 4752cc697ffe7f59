//! A stand-in for the `gitlab-runner` helper binary inside the job pod: `--version`,
//! `cache-archiver` and `cache-extractor` with the runner's flags and HTTP behaviour
//! (shared/reference/cache.md §1.4): a deflate zip written with data descriptors like Go's
//! archive/zip, a presigned PUT with the signed `--header`s and `Last-Modified`, two HEADs, then a
//! GET — or, with `FF_USE_PARALLEL_CACHE_TRANSFER=true` and `CACHE_CONCURRENCY>1`, a `bytes=0-0`
//! probe and 16 MiB ranged GETs on the same URL.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const RANGE_SIZE: u64 = 16 << 20;

#[derive(Parser)]
#[command(name = "gitlab-runner", disable_version_flag = true)]
struct Cli {
    #[arg(long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    CacheArchiver(ArchiverArgs),
    CacheExtractor(ExtractorArgs),
}

#[derive(Args)]
struct ArchiverArgs {
    #[arg(long)]
    file: PathBuf,
    #[arg(long)]
    alternate_file: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    #[arg(long = "path")]
    paths: Vec<String>,
    #[arg(long)]
    untracked: bool,
    #[arg(long)]
    url: Option<String>,
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long)]
    check_url: Option<String>,
    #[arg(long)]
    env_file: Option<PathBuf>,
}

#[derive(Args)]
struct ExtractorArgs {
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    #[arg(long)]
    url: Option<String>,
    #[arg(long)]
    head_url: Option<String>,
    #[arg(long)]
    alternate_url: Option<String>,
    #[arg(long)]
    alternate_head_url: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        println!("Version:      19.4.0\nGit revision: d79f3e7b (spotrun test stand-in)");
        return ExitCode::SUCCESS;
    }
    let Some(command) = cli.command else {
        eprintln!("usage: gitlab-runner --version | cache-archiver | cache-extractor");
        return ExitCode::from(1);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let result = rt.block_on(async {
        match command {
            Command::CacheArchiver(a) => archive(&client, a).await,
            Command::CacheExtractor(a) => extract(&client, a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("FATAL: {e}");
            ExitCode::from(1)
        }
    }
}

/// The URL without its query, as the runner logs it (never the signature).
fn redacted(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn walk(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        out.push(path.to_path_buf());
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            walk(&e.path(), out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// A writer that hides `Seek`, so the zip crate streams with data descriptors like Go's archive/zip.
struct Streaming<W: Write>(W);

impl<W: Write> Write for Streaming<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn write_zip(archive: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    if let Some(dir) = archive.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = archive.with_extension("zip.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut zip = zip::ZipWriter::new_stream(Streaming(std::io::BufWriter::new(file)));
    for path in files {
        let meta = std::fs::metadata(path)?;
        let name = path.to_string_lossy().trim_start_matches("./").to_owned();
        let mtime = meta.modified().ok().map(zip_time);
        let mut opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(5));
        if let Some(t) = mtime {
            opts = opts.last_modified_time(t);
        }
        if meta.is_dir() {
            zip.add_directory(format!("{name}/"), opts)?;
        } else {
            zip.start_file(name, opts)?;
            let mut f = std::fs::File::open(path)?;
            std::io::copy(&mut f, &mut zip)?;
        }
    }
    let mut inner = zip.finish()?;
    inner.flush()?;
    drop(inner);
    std::fs::rename(&tmp, archive)?;
    Ok(())
}

#[allow(clippy::many_single_char_names)] // Reason: keeps the published algorithm's variable names.
fn zip_time(t: SystemTime) -> zip::DateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant), enough for a zip's DOS timestamp.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    zip::DateTime::from_date_and_time(
        u16::try_from(y).unwrap_or(1980),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
        u8::try_from(rem / 3600).unwrap_or(0),
        u8::try_from(rem % 3600 / 60).unwrap_or(0),
        u8::try_from(rem % 60).unwrap_or(0),
    )
    .unwrap_or_default()
}

async fn archive(client: &HttpClient, a: ArchiverArgs) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for p in &a.paths {
        let path = Path::new(p.trim_end_matches('/'));
        if path.exists() {
            let before = files.len();
            walk(path, &mut files)?;
            println!(
                "{p}: found {} matching artifact files and directories",
                files.len() - before
            );
        } else {
            println!(
                "WARNING: {p}: no matching files. Ensure that the artifact path is relative to the working directory"
            );
        }
    }
    if files.is_empty() {
        println!("WARNING: No files to archive.");
    }
    write_zip(&a.file, &files)?;
    if let Some(env_file) = &a.env_file {
        let _ = std::fs::read_to_string(env_file);
    }
    let Some(url) = a.url else {
        return Ok(());
    };
    let body = tokio::fs::read(&a.file).await?;
    let mtime = std::fs::metadata(&a.file)?.modified()?;
    println!("Uploading cache.zip to {}", redacted(&url));
    let mut req = http::Request::put(&url)
        .header("Content-Type", "application/octet-stream")
        .header("Last-Modified", httpdate::fmt_http_date(mtime))
        .header("Content-Length", body.len());
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("bad --header {h:?}"))?;
        // Go's net/http takes Host from the URL, never from a header; `Header.Set` canonicalises
        // names, so `x-amz-meta-cachekey` and `X-Amz-Meta-Cachekey` end up as one header.
        if !k.trim().eq_ignore_ascii_case("host")
            && let Some(headers) = req.headers_mut()
        {
            headers.insert(
                http::HeaderName::from_bytes(k.trim().as_bytes())?,
                http::HeaderValue::from_str(v.trim())?,
            );
        }
    }
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(a.timeout * 60),
        client.request(req.body(Full::new(Bytes::from(body)))?),
    )
    .await??;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "received: {} {}",
            status.as_u16(),
            s3_error(&text).unwrap_or_default()
        );
    }
    Ok(())
}

fn s3_error(body: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(body).ok()?;
    let code = s.split("<Code>").nth(1)?.split("</Code>").next()?;
    Some(code.to_owned())
}

async fn head(client: &HttpClient, url: &str) -> Option<SystemTime> {
    let req = http::Request::head(url)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = client.request(req).await.ok()?;
    if resp.status() != http::StatusCode::OK {
        return None;
    }
    let lm = resp.headers().get("last-modified")?.to_str().ok()?;
    httpdate::parse_http_date(lm).ok()
}

async fn get(
    client: &HttpClient,
    url: &str,
    range: Option<(u64, u64)>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
    let mut req = http::Request::get(url);
    if let Some((a, b)) = range {
        req = req.header("Range", format!("bytes={a}-{b}"));
    }
    Ok(client.request(req.body(Full::new(Bytes::new()))?).await?)
}

async fn extract(client: &HttpClient, a: ExtractorArgs) -> anyhow::Result<()> {
    let Some(url) = a.url.clone() else {
        anyhow::bail!("missing --url");
    };
    // Two HEADs, primary and alternate; any non-200 means "unavailable". The newer one wins.
    let primary = match &a.head_url {
        Some(h) => head(client, h).await,
        None => None,
    };
    let alternate = match &a.alternate_head_url {
        Some(h) => head(client, h).await,
        None => None,
    };
    let url = match (primary, alternate, &a.alternate_url) {
        (p, Some(alt), Some(alt_url)) if p.is_none_or(|p| alt > p) => alt_url.clone(),
        _ => url,
    };
    let parallel = std::env::var("FF_USE_PARALLEL_CACHE_TRANSFER").is_ok_and(|v| v == "true")
        && std::env::var("CACHE_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|c| c > 1);
    println!("Downloading cache from {}", redacted(&url));
    let data = if parallel {
        download_ranged(client, &url).await?
    } else {
        let resp = get(client, &url, None).await?;
        if resp.status() == http::StatusCode::NOT_FOUND {
            println!("WARNING: Cache file does not exist");
            anyhow::bail!("cache file does not exist");
        }
        if !resp.status().is_success() {
            anyhow::bail!("received: {}", resp.status().as_u16());
        }
        check_length_and_collect(resp).await?
    };
    if let Some(dir) = a.file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.file, &data)?;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data))?;
    zip.extract(".")?;
    println!("Successfully extracted {} entries", zip.len());
    Ok(())
}

async fn check_length_and_collect(
    resp: http::Response<hyper::body::Incoming>,
) -> anyhow::Result<Vec<u8>> {
    let expected = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    if let Some(n) = expected
        && n != body.len()
    {
        anyhow::bail!("short body: {} of {n} bytes", body.len());
    }
    Ok(body)
}

async fn download_ranged(client: &HttpClient, url: &str) -> anyhow::Result<Vec<u8>> {
    let probe = get(client, url, Some((0, 0))).await?;
    if probe.status() == http::StatusCode::NOT_FOUND {
        println!("WARNING: Cache file does not exist");
        anyhow::bail!("cache file does not exist");
    }
    if probe.status() != http::StatusCode::PARTIAL_CONTENT {
        // No range support: the helper falls back to the whole body.
        return check_length_and_collect(probe).await;
    }
    let total: u64 = probe
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('/').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("probe without a usable Content-Range"))?;
    let _ = probe.into_body().collect().await?;
    let mut tasks = Vec::new();
    let mut start = 0;
    while start < total {
        let end = (start + RANGE_SIZE).min(total) - 1;
        let client = client.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let resp = get(&client, &url, Some((start, end))).await?;
            if resp.status() != http::StatusCode::PARTIAL_CONTENT {
                anyhow::bail!("range {start}-{end}: status {}", resp.status().as_u16());
            }
            check_length_and_collect(resp).await
        }));
        start = end + 1;
    }
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for t in tasks {
        out.extend_from_slice(&t.await??);
    }
    Ok(out)
}
