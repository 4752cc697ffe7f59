//! P7: peak RSS (`VmHWM`) of the proxy binary the image ships while it takes one big streaming PUT,
//! and while it takes many concurrent PUTs; bodies are generated as they are sent, so the client
//! holds no copy.

use std::path::Path;

use anyhow::Context;

use crate::MIB;
use crate::data::unique_stream;
use crate::http::{Http, streaming};
use crate::proxyproc::{ProxyProcess, ProxyStore};
use crate::report::{Goal, Row};

async fn put_stream(
    http: &Http,
    proxy: &ProxyProcess,
    key: &str,
    size: u64,
    seed: u64,
) -> anyhow::Result<()> {
    let (url, headers) = proxy.signer().presign("PUT", key);
    http.send_ok(
        "PUT",
        &url,
        &headers,
        streaming(unique_stream(size, 1 << 20, seed)),
        size,
    )
    .await
    .with_context(|| format!("streaming PUT of {key} (log tail: {})", proxy.log_tail()))?;
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// Peak RSS of a fresh `bin` taking one `big`-byte PUT, and its RSS when idle.
async fn one_big_put(http: &Http, bin: &Path, big: u64) -> anyhow::Result<(u64, u64)> {
    let proxy = ProxyProcess::start(bin, &ProxyStore::Disk)?;
    let idle = proxy.peak_rss()?;
    put_stream(http, &proxy, "p7/big", big, 7).await?;
    Ok((proxy.peak_rss()?, idle))
}

/// Two rows, each from a fresh process of `shipped` (the image's static binary): one `big`-byte
/// PUT, then `n` concurrent `each`-byte PUTs. The one big PUT is also measured with `glibc_bin`
/// (the release build) for the details: its allocator behaves differently (`benches/NOTES.md`).
pub async fn run(
    shipped: &Path,
    glibc_bin: &Path,
    big: u64,
    n: usize,
    each: u64,
) -> anyhow::Result<Vec<Row>> {
    let http = Http::new();
    let (single, idle) = one_big_put(&http, shipped, big).await?;
    let (glibc_single, _) = one_big_put(&http, glibc_bin, big).await?;

    let proxy = ProxyProcess::start(shipped, &ProxyStore::Disk)?;
    let puts = (0..n).map(|i| {
        let (http, proxy) = (&http, &proxy);
        async move {
            put_stream(
                http,
                proxy,
                &format!("p7/concurrent-{i}"),
                each,
                100 + i as u64,
            )
            .await
        }
    });
    futures::future::try_join_all(puts).await?;
    let concurrent = proxy.peak_rss()?;
    drop(proxy);
    Ok(vec![
        Row {
            id: "P7",
            measure: format!("proxy peak RSS, one streaming PUT of {} MiB", big / MIB),
            value: mib(single),
            unit: " MiB",
            goal: Goal::AtMost(64.0),
            detail: format!(
                "VmHWM of the image's static (musl) binary; {:.1} MiB when idle; the glibc \
                 release build: {:.1} MiB",
                mib(idle),
                mib(glibc_single)
            ),
        },
        Row {
            id: "P7c",
            measure: format!("proxy peak RSS, {n} concurrent PUTs of {} MiB", each / MIB),
            value: mib(concurrent),
            unit: " MiB",
            goal: Goal::AtMost(256.0),
            detail: "VmHWM of a fresh process of the image's static binary".into(),
        },
    ])
}
