//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io`): the columns
//! `kubectl get` shows for each resource.

use serde_json::{Value, json};

use super::clock;
use super::store::Res;

fn col(name: &str, ty: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

fn columns(res: Res) -> Vec<Value> {
    match res {
        Res::Pods => vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
        ],
        Res::Nodes => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Roles", "string", 0),
            col("Age", "string", 0),
            col("Version", "string", 0),
        ],
        Res::Events => vec![
            col("Last Seen", "string", 0),
            col("Type", "string", 0),
            col("Reason", "string", 0),
            col("Object", "string", 0),
            col("Message", "string", 0),
        ],
        Res::Namespaces => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Age", "string", 0),
        ],
        Res::Secrets => vec![
            col("Name", "string", 0),
            col("Type", "string", 0),
            col("Data", "integer", 0),
            col("Age", "string", 0),
        ],
        Res::ConfigMaps => vec![
            col("Name", "string", 0),
            col("Data", "integer", 0),
            col("Age", "string", 0),
        ],
    }
}

fn pod_status(p: &Value) -> String {
    if !p["metadata"]["deletionTimestamp"].is_null() {
        return "Terminating".into();
    }
    let phase = p["status"]["phase"].as_str().unwrap_or("Pending");
    if let Some(r) = p["status"]["reason"].as_str() {
        return r.into();
    }
    let statuses = p["status"]["containerStatuses"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for init in p["status"]["initContainerStatuses"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if init["state"]["terminated"]["exitCode"]
            .as_i64()
            .is_some_and(|c| c != 0)
        {
            return "Init:Error".into();
        }
        if init["state"]["terminated"].is_null() {
            return "Init:0".into();
        }
    }
    for c in statuses {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str() {
            return r.into();
        }
    }
    if matches!(phase, "Succeeded" | "Failed") {
        for c in statuses {
            if let Some(r) = c["state"]["terminated"]["reason"].as_str() {
                return r.into();
            }
        }
    }
    phase.into()
}

fn cells(res: Res, o: &Value) -> Vec<Value> {
    let name = o["metadata"]["name"].clone();
    let age = clock::age(o["metadata"]["creationTimestamp"].as_str().unwrap_or(""));
    let data_len = |o: &Value| {
        o["data"].as_object().map_or(0, serde_json::Map::len)
            + o["binaryData"].as_object().map_or(0, serde_json::Map::len)
    };
    match res {
        Res::Pods => {
            let statuses = o["status"]["containerStatuses"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c["restartCount"].as_i64())
                .sum();
            let ip = o["status"]["podIP"].as_str().unwrap_or("<none>");
            let node = o["spec"]["nodeName"].as_str().unwrap_or("<none>");
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts.to_string()),
                json!(age),
                json!(ip),
                json!(node),
            ]
        }
        Res::Nodes => {
            let ready = o["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .is_some_and(|c| c["status"] == "True");
            let mut status = if ready {
                "Ready".to_string()
            } else {
                "NotReady".to_string()
            };
            if o["spec"]["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            vec![
                name,
                json!(status),
                json!("<none>"),
                json!(age),
                o["status"]["nodeInfo"]["kubeletVersion"].clone(),
            ]
        }
        Res::Events => {
            let io = &o["involvedObject"];
            let object = format!(
                "{}/{}",
                io["kind"].as_str().unwrap_or("").to_lowercase(),
                io["name"].as_str().unwrap_or("")
            );
            let seen = clock::age(o["lastTimestamp"].as_str().unwrap_or(""));
            vec![
                json!(seen),
                o["type"].clone(),
                o["reason"].clone(),
                json!(object),
                o["message"].clone(),
            ]
        }
        Res::Namespaces => vec![name, o["status"]["phase"].clone(), json!(age)],
        Res::Secrets => vec![name, o["type"].clone(), json!(data_len(o)), json!(age)],
        Res::ConfigMaps => vec![name, json!(data_len(o)), json!(age)],
    }
}

/// A `meta.k8s.io/v1` Table of `objs`; rows carry the full object or only its metadata.
pub fn table(res: Res, objs: &[&Value], rv: u64, full_object: bool) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let object = if full_object {
                let mut v = (*o).clone();
                v["kind"] = json!(res.kind());
                v["apiVersion"] = json!("v1");
                v
            } else {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
            };
            json!({"cells": cells(res, o), "object": object})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": columns(res), "rows": rows})
}

/// Whether an `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_rows() {
        let p = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Pending", "podIP": "127.0.0.1", "containerStatuses": [{"ready": true, "restartCount": 1}, {"ready": false, "restartCount": 2, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}});
        let t = table(Res::Pods, &[&p], 7, false);
        let c = &t["rows"][0]["cells"];
        assert_eq!(
            (c[0].as_str(), c[1].as_str(), c[2].as_str(), c[3].as_str()),
            (
                Some("web"),
                Some("1/2"),
                Some("ImagePullBackOff"),
                Some("3")
            )
        );
        assert!(c[4].as_str().unwrap().ends_with('d'));
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
