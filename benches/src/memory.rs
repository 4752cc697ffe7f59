//! P7: peak RSS (`VmHWM`) of the proxy binary while it takes one big streaming PUT, and while it takes
//! many concurrent PUTs; bodies are generated as they are sent, so the client holds no copy.

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

/// Two rows: one `big`-byte PUT, then `n` concurrent `each`-byte PUTs (a fresh process each).
pub async fn run(proxy_bin: &Path, big: u64, n: usize, each: u64) -> anyhow::Result<Vec<Row>> {
    let http = Http::new();
    let proxy = ProxyProcess::start(proxy_bin, &ProxyStore::Disk)?;
    let idle = proxy.peak_rss()?;
    put_stream(&http, &proxy, "p7/big", big, 7).await?;
    let single = proxy.peak_rss()?;
    drop(proxy);

    let proxy = ProxyProcess::start(proxy_bin, &ProxyStore::Disk)?;
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
            detail: format!("VmHWM of the proxy process; {:.1} MiB when idle", mib(idle)),
        },
        Row {
            id: "P7c",
            measure: format!("proxy peak RSS, {n} concurrent PUTs of {} MiB", each / MIB),
            value: mib(concurrent),
            unit: " MiB",
            goal: Goal::AtMost(256.0),
            detail: "VmHWM of a fresh proxy process".into(),
        },
    ])
}
