//! The pure pod builder: operator settings + job → `PodPlan` (the Pod and its optional registry
//! Secret). No IO here, so every decision is snapshot-testable.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HostAlias,
    LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    Pod, PodSecurityContext, PodSpec, PreferredSchedulingTerm, ResourceRequirements, Secret,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::job::{CustomEnv, ImageSpec, JobIdentity, JobKnobs, JobResources, JobResponse};
use crate::naming::{self, KIND_LABEL, MANAGED_BY_KEY, MANAGED_BY_VALUE, POD_LABEL};
use crate::quantity::Quantity;
use crate::settings::{PatchType, PullPolicy, ResourceSettings, Settings, SpotPolicy};

/// GKE's spot node label and taint key.
pub const SPOT_LABEL: &str = "cloud.google.com/gke-spot";
/// The pod label recording the spot policy the pod was placed with.
pub const SPOT_POLICY_LABEL: &str = "spotrun.dev/spot-policy";
pub const BUILD_CONTAINER: &str = "build";
pub const HELPER_CONTAINER: &str = "helper";
/// Where the helper container finds `gitlab-runner` (a link to `gitlab-runner-helper`).
pub const TOOLS_DIR: &str = "/spotrun/bin";

/// The node label the helper image's architecture follows.
pub const ARCH_LABEL: &str = "kubernetes.io/arch";
/// Node architectures GitLab builds helper images for (Kubernetes spelling).
pub const KNOWN_ARCHES: [&str; 6] = ["amd64", "arm64", "arm", "s390x", "ppc64le", "riscv64"];
/// The architecture a pod runs on when nothing selects one (the Kubernetes executor's default).
const DEFAULT_ARCH: &str = "amd64";

/// The helper image tag's name for a Kubernetes architecture (`amd64` → `x86_64`), as GitLab
/// tags `gitlab-runner-helper`.
#[must_use]
pub fn helper_arch(k8s_arch: &str) -> Option<&'static str> {
    Some(match k8s_arch {
        "amd64" => "x86_64",
        "arm64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "ppc64le" => "ppc64le",
        "riscv64" => "riscv64",
        _ => return None,
    })
}

/// The init container that copies `spotrun-launch` into the pod.
pub const LAUNCHER_CONTAINER: &str = "launcher";
/// Where build and helper containers find `spotrun-launch` (a read-only emptyDir).
pub const LAUNCHER_DIR: &str = "/spotrun/launcher";
/// The in-pod launcher every stage exec runs (see `stage::launcher`).
pub const LAUNCHER: &str = "/spotrun/launcher/spotrun-launch";

/// Keeps the build container alive until the pod is deleted: our launcher as its pid 1 (it reaps
/// orphans and exits on TERM), so nothing but `sh` is needed from the image; `sh -c` keeps an
/// image without a shell failing when the pod starts rather than at its first stage.
pub const IDLE_SCRIPT: &str = "exec /spotrun/launcher/spotrun-launch idle";

/// The helper image ships `gitlab-runner-helper`; the runner's scripts call `gitlab-runner`.
const HELPER_IDLE_SCRIPT: &str = "if ! command -v gitlab-runner >/dev/null 2>&1 && command -v gitlab-runner-helper >/dev/null 2>&1; then ln -sf \"$(command -v gitlab-runner-helper)\" /spotrun/bin/gitlab-runner; fi; trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The job asked for an image the operator does not allow: the job's fault.
    #[error("image {image:?} is not allowed by {key} ({globs})")]
    ImageNotAllowed {
        image: String,
        key: &'static str,
        globs: String,
    },
    /// The operator's `pod.patch` does not apply or yields an invalid Pod: the operator's fault.
    #[error("pod.patch: {0}")]
    Patch(String),
    /// The job asked for pull policies the operator does not allow (the Kubernetes executor's
    /// wording): the job's fault.
    #[error(
        "invalid pull policy for image {image:?}: pull_policy ([{requested}]) defined in GitLab pipeline config is not one of the allowed_pull_policies ([{allowed}])"
    )]
    PullPolicyNotAllowed {
        image: String,
        requested: String,
        allowed: String,
    },
    /// A `pull_policy` value GitLab does not define.
    #[error(
        "invalid pull policy for image {image:?}: {value:?} is not always, if-not-present or never"
    )]
    UnknownPullPolicy { image: String, value: String },
    /// A volume whose `$VAR` expansion gave an invalid value (load-time checks passed, so the job's
    /// variables did it): the job's fault.
    #[error("volume: {0}")]
    Volume(String),
    /// The pod selects an architecture GitLab has no helper image for (the operator's selector is
    /// checked at load time, so the job's node-selector overwrite did it): the job's fault.
    #[error(
        "no helper image for architecture {arch:?} (node selector kubernetes.io/arch; known: {known})"
    )]
    UnsupportedArch { arch: String, known: String },
}

/// Everything `plan_pod` needs; built by the IO layer from the environment.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub job: &'a JobResponse,
    pub identity: &'a JobIdentity,
    pub env: &'a CustomEnv,
    pub knobs: &'a JobKnobs,
    /// Placement after the job override and the preemption fallback were applied.
    pub spot: SpotPolicy,
    /// Which entry of each image's pull-policy list to use (0, then 1 after a failed pull, ...).
    pub pull_attempt: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    pub pod: Pod,
    pub secret: Option<Secret>,
    /// Job-log lines about the plan (a pull policy left out).
    pub notes: Vec<String>,
    /// How many pull attempts the pull-policy lists allow (the longest list, at least 1).
    pub pull_attempts: usize,
}

/// The pull policies of one image: the job's within what the operator allows, else the
/// operator's `pull_policy`. Empty: the cluster's default.
pub fn pull_policies(
    settings: &Settings,
    image: &str,
    job: &[String],
    notes: &mut Vec<String>,
) -> Result<Vec<PullPolicy>, PlanError> {
    let configured = &settings.images.pull_policy;
    let mut requested = Vec::new();
    for v in job.iter().filter(|v| !v.is_empty()) {
        let p = PullPolicy::parse(v).ok_or_else(|| PlanError::UnknownPullPolicy {
            image: image.into(),
            value: v.clone(),
        })?;
        if !requested.contains(&p) {
            requested.push(p);
        }
    }
    if requested.is_empty() {
        return Ok(configured.clone());
    }
    let allowed = if settings.images.allowed_pull_policies.is_empty() {
        configured
    } else {
        &settings.images.allowed_pull_policies
    };
    // Nothing configured at all: the job decides (the Kubernetes executor would refuse).
    if allowed.is_empty() {
        return Ok(requested);
    }
    let names = |v: &[PullPolicy]| v.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" ");
    let kept: Vec<PullPolicy> = requested
        .iter()
        .copied()
        .filter(|p| allowed.contains(p))
        .collect();
    if kept.is_empty() {
        return Err(PlanError::PullPolicyNotAllowed {
            image: image.into(),
            requested: names(&requested),
            allowed: names(allowed),
        });
    }
    if kept.len() < requested.len() {
        notes.push(format!(
            "WARNING: image {image:?}: pull_policy [{}] is not all in allowed_pull_policies [{}]; using [{}]",
            names(&requested),
            names(allowed),
            names(&kept)
        ));
    }
    Ok(kept)
}

/// The Kubernetes `imagePullPolicy` of a policy list on a given attempt (the last entry sticks).
fn policy_for_attempt(list: &[PullPolicy], attempt: usize) -> Option<String> {
    list.get(attempt)
        .or_else(|| list.last())
        .map(|p| p.k8s().to_string())
}

/// The effective spot policy: operator default, then an allowed job override, then the fallback.
#[must_use]
pub fn effective_spot_policy(
    settings: &Settings,
    knobs: &JobKnobs,
    fallback_to_on_demand: bool,
) -> SpotPolicy {
    if fallback_to_on_demand {
        return SpotPolicy::Never;
    }
    knobs.spot.unwrap_or(settings.spot.policy)
}

/// Builds the pod (and registry secret) for a job.
pub fn plan_pod(settings: &Settings, input: &PlanInput<'_>) -> Result<PodPlan, PlanError> {
    let job = input.job;
    let name = input.identity.pod_name();
    let image = if job.image.name.is_empty() {
        settings.images.default_image.clone()
    } else {
        job.image.name.clone()
    };
    if !job.image.name.is_empty() {
        check_allowed(
            &image,
            &settings.images.allowed_images,
            "images.allowed_images",
        )?;
    }
    for s in &job.services {
        check_allowed(
            &s.name,
            &settings.images.allowed_services,
            "images.allowed_services",
        )?;
    }

    let labels = pod_labels(settings, input, &name);
    let annotations = pod_annotations(settings, input);
    let dirs = &settings.dirs;
    let (user_volumes, user_mounts) = settings
        .volumes
        .plan(
            &|k| input.env.0.get(k).cloned().unwrap_or_default(),
            &[dirs.scripts_dir.as_str(), dirs.logs_dir.as_str(), TOOLS_DIR],
        )
        .map_err(PlanError::Volume)?;
    // An operator volume at the builds or cache directory takes the place of our emptyDir there,
    // as in the Kubernetes executor (a PVC for a persistent checkout).
    let taken = |dir: &str| {
        user_mounts
            .iter()
            .any(|m| m.mount_path.trim_end_matches('/') == dir.trim_end_matches('/'))
    };
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if !taken(&dirs.builds_dir) {
        volumes.push(empty_dir("builds"));
        mounts.push(mount("builds", &dirs.builds_dir));
    }
    volumes.extend([empty_dir("scripts"), empty_dir("logs")]);
    mounts.extend([
        mount("scripts", &dirs.scripts_dir),
        mount("logs", &dirs.logs_dir),
    ]);
    if dirs.cache_volume
        && !taken(&dirs.cache_dir)
        && !dirs
            .cache_dir
            .starts_with(&format!("{}/", dirs.builds_dir.trim_end_matches('/')))
    {
        volumes.push(empty_dir("cache"));
        mounts.push(mount("cache", &dirs.cache_dir));
    }
    volumes.push(empty_dir("tools"));
    volumes.extend(user_volumes);
    // Every container gets them, as in the Kubernetes executor.
    mounts.extend(user_mounts);

    let (mut node_selector, affinity, mut tolerations) =
        placement(settings, input.knobs, input.spot);
    let helper_image = helper_image(settings, &mut node_selector, &mut tolerations)?;
    volumes.push(empty_dir("launcher"));
    // Build and helper run stages through the launcher; services do not.
    let mut stage_mounts = mounts.clone();
    stage_mounts.push(VolumeMount {
        read_only: Some(true),
        ..mount("launcher", LAUNCHER_DIR)
    });

    let mut notes = Vec::new();
    let build_policies = pull_policies(settings, &image, &job.image.pull_policy, &mut notes)?;
    let helper_policies = settings.images.pull_policy.clone();
    let mut service_policies = Vec::new();
    for svc in &job.services {
        service_policies.push(pull_policies(
            settings,
            &svc.name,
            &svc.pull_policy,
            &mut notes,
        )?);
    }
    let pull_attempts = std::iter::once(&build_policies)
        .chain(std::iter::once(&helper_policies))
        .chain(service_policies.iter())
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(1);
    let pull_policy = policy_for_attempt(&build_policies, input.pull_attempt);

    let build_resources = merge_job_resources(&settings.resources.build, &input.knobs.resources);
    let build_security = job_image_security(
        settings,
        settings.pod.build_security_context.as_ref(),
        "pod.build_security_context",
        &job.image,
        &image,
        &mut notes,
    );
    let mut build = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(image),
        image_pull_policy: pull_policy.clone(),
        volume_mounts: Some(stage_mounts.clone()),
        resources: resources(&build_resources),
        security_context: build_security,
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    // Like the Kubernetes executor with FF_KUBERNETES_HONOR_ENTRYPOINT: a real entrypoint wraps our
    // shell; `[""]` (GitLab's way to clear it) or none means our shell is the command.
    let entrypoint: Vec<String> = job
        .image
        .entrypoint
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    if entrypoint.is_empty() {
        build.command = Some(vec!["sh".into(), "-c".into(), IDLE_SCRIPT.into()]);
    } else {
        build.command = Some(entrypoint);
        build.args = Some(vec!["sh".into(), "-c".into(), IDLE_SCRIPT.into()]);
    }

    let helper_resources = resources(&merge_job_resources(
        &settings.resources.helper,
        &input.knobs.helper_resources,
    ));
    let helper_security = container_security(settings.pod.helper_security_context.as_ref());
    let mut helper_mounts = stage_mounts;
    helper_mounts.push(mount("tools", TOOLS_DIR));
    let helper = Container {
        name: HELPER_CONTAINER.into(),
        image: Some(helper_image),
        image_pull_policy: policy_for_attempt(&helper_policies, input.pull_attempt),
        command: Some(vec!["sh".into(), "-c".into(), HELPER_IDLE_SCRIPT.into()]),
        env: Some(vec![EnvVar {
            name: "PATH".into(),
            value: Some(format!(
                "{TOOLS_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            )),
            value_from: None,
        }]),
        volume_mounts: Some(helper_mounts),
        resources: helper_resources.clone(),
        security_context: helper_security.clone(),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    let launcher = Container {
        name: LAUNCHER_CONTAINER.into(),
        image: Some(settings.images.launcher_image.clone()),
        image_pull_policy: policy_for_attempt(&helper_policies, input.pull_attempt),
        command: Some(vec![
            "spotrun-launch".into(),
            "install".into(),
            LAUNCHER_DIR.into(),
        ]),
        volume_mounts: Some(vec![mount("launcher", LAUNCHER_DIR)]),
        // The helper's: a namespace quota or LimitRange may require them on every container.
        resources: helper_resources,
        security_context: helper_security,
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    let mut containers = vec![build, helper];
    let mut host_names: Vec<String> = Vec::new();
    let names = service_container_names(&job.services);
    for (i, (svc, cname)) in job.services.iter().zip(names).enumerate() {
        for h in service_host_names(svc) {
            if !host_names.contains(&h) {
                host_names.push(h);
            }
        }
        let policy = policy_for_attempt(&service_policies[i], input.pull_attempt);
        containers.push(service_container(
            settings, input, i, cname, &mounts, policy, &mut notes,
        ));
    }

    let mut secret = registry_secret(input, &name, &labels);
    let mut pull_secrets: Vec<LocalObjectReference> = settings
        .pod
        .image_pull_secrets
        .iter()
        .map(|s| LocalObjectReference { name: s.clone() })
        .collect();
    if let Some(s) = &secret {
        pull_secrets.push(LocalObjectReference {
            name: s.metadata.name.clone().unwrap_or_default(),
        });
    }
    if settings.pod.use_service_account_image_pull_secrets {
        // The kubelet uses the service account's imagePullSecrets only when the pod names none.
        pull_secrets.clear();
        if secret.take().is_some() {
            notes.push(
                "Registry credentials of the job are not used: pods pull with their service account's imagePullSecrets (use_service_account_image_pull_secrets)".into(),
            );
        }
    }
    let timeout = job_timeout(settings, input);
    let spec = PodSpec {
        init_containers: Some(vec![launcher]),
        containers,
        volumes: Some(volumes),
        restart_policy: Some("Never".into()),
        active_deadline_seconds: Some(
            i64::try_from(timeout + settings.timeouts.deadline_margin_seconds).unwrap_or(i64::MAX),
        ),
        termination_grace_period_seconds: Some(settings.pod.termination_grace_period_seconds),
        automount_service_account_token: Some(settings.pod.automount_service_account_token),
        service_account_name: input
            .knobs
            .service_account
            .clone()
            .or_else(|| settings.pod.service_account.clone()),
        priority_class_name: settings.pod.priority_class_name.clone(),
        enable_service_links: Some(false),
        host_aliases: (!host_names.is_empty()).then(|| {
            vec![HostAlias {
                ip: "127.0.0.1".into(),
                hostnames: Some(host_names),
            }]
        }),
        image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        affinity,
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        security_context: settings.pod.security_context.as_ref().and_then(|t| {
            serde_json::from_value::<PodSecurityContext>(serde_json::to_value(t).ok()?).ok()
        }),
        ..PodSpec::default()
    };
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    };
    let mut pod = apply_patch(settings, pod)?;
    if settings.pod.patch.is_some() {
        keep_spot_placement(&mut pod, input.spot);
    }
    Ok(PodPlan {
        pod,
        secret,
        notes,
        pull_attempts,
    })
}

fn check_allowed(image: &str, globs: &[String], key: &'static str) -> Result<(), PlanError> {
    if globs.is_empty() {
        return Ok(());
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in globs {
        // Validated at load time; an invalid glob here simply never matches.
        if let Ok(g) = globset::GlobBuilder::new(g)
            .literal_separator(false)
            .build()
        {
            b.add(g);
        }
    }
    let set = b.build().map_err(|e| PlanError::Patch(e.to_string()))?;
    if set.is_match(image) {
        Ok(())
    } else {
        Err(PlanError::ImageNotAllowed {
            image: image.into(),
            key,
            globs: globs.join(", "),
        })
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    }
}

fn container_security(t: Option<&toml::Table>) -> Option<SecurityContext> {
    serde_json::from_value(serde_json::to_value(t?).ok()?).ok()
}

/// The security context of a container running a job image (build, service): the operator's,
/// plus the image's `kubernetes: user` (uid, gid) where the operator allows it. The operator's
/// own `runAsUser` / `runAsGroup` (container or pod level) win (MR 5724: the administrator always
/// wins); a job ID outside a non-empty `pod.allowed_users` / `pod.allowed_groups` is not applied.
/// Whatever is not applied is named in one warning line.
fn job_image_security(
    settings: &Settings,
    operator: Option<&toml::Table>,
    operator_key: &str,
    spec: &ImageSpec,
    image: &str,
    notes: &mut Vec<String>,
) -> Option<SecurityContext> {
    let mut sc = container_security(operator);
    let user = match spec.kubernetes_user() {
        Ok(None) => return sc,
        Ok(Some(u)) => u,
        Err(raw) => {
            notes.push(format!(
                "WARNING: image {image:?}: kubernetes user {raw} ignored: not a numeric uid or uid:gid (user names are not resolved); the image's own user runs it"
            ));
            return sc;
        }
    };
    let pod_level = |k: &str| {
        settings
            .pod
            .security_context
            .as_ref()
            .and_then(|t| t.get(k))
            .and_then(toml::Value::as_integer)
    };
    let operator_id = |container: Option<i64>, field: &str| {
        container
            .map(|v| (v, operator_key))
            .or_else(|| pod_level(field).map(|v| (v, "pod.security_context")))
    };
    let mut refused = Vec::new();
    let mut decide = |what: &str,
                      field: &str,
                      want: i64,
                      op: Option<(i64, &str)>,
                      allowed: &[String],
                      key: &str| {
        if let Some((v, by)) = op {
            if v == want {
                return Some(want);
            }
            refused.push(format!("{by} sets {field} {v}"));
            return None;
        }
        if !allowed.is_empty() && !allowed.iter().any(|a| a.parse() == Ok(want)) {
            refused.push(format!(
                "{what} {want} is not in {key} ({})",
                allowed.join(", ")
            ));
            return None;
        }
        Some(want)
    };
    let current = sc.clone().unwrap_or_default();
    let uid = decide(
        "uid",
        "runAsUser",
        user.uid,
        operator_id(current.run_as_user, "runAsUser"),
        &settings.pod.allowed_users,
        "pod.allowed_users",
    );
    let gid = user.gid.and_then(|g| {
        decide(
            "gid",
            "runAsGroup",
            g,
            operator_id(current.run_as_group, "runAsGroup"),
            &settings.pod.allowed_groups,
            "pod.allowed_groups",
        )
    });
    if !refused.is_empty() {
        let asked = match user.gid {
            Some(g) => format!("{}:{g}", user.uid),
            None => user.uid.to_string(),
        };
        let applied = match (uid, gid) {
            (None, None) => "not applied".to_string(),
            (Some(u), None) => format!("applied as uid {u} only"),
            (None, Some(g)) => format!("applied as gid {g} only"),
            (Some(u), Some(g)) => format!("applied as {u}:{g}"),
        };
        notes.push(format!(
            "WARNING: image {image:?}: kubernetes user \"{asked}\" {applied}: {}",
            refused.join("; ")
        ));
    }
    if uid.is_some() || gid.is_some() {
        let c = sc.get_or_insert_with(SecurityContext::default);
        if uid.is_some() {
            c.run_as_user = uid;
        }
        if gid.is_some() {
            c.run_as_group = gid;
        }
    }
    sc
}

fn merge_job_resources(base: &ResourceSettings, j: &JobResources) -> ResourceSettings {
    let pick = |job: &Option<Quantity>, op: &Option<Quantity>| job.clone().or_else(|| op.clone());
    ResourceSettings {
        cpu_request: pick(&j.cpu_request, &base.cpu_request),
        cpu_limit: pick(&j.cpu_limit, &base.cpu_limit),
        memory_request: pick(&j.memory_request, &base.memory_request),
        memory_limit: pick(&j.memory_limit, &base.memory_limit),
        ephemeral_storage_request: pick(
            &j.ephemeral_storage_request,
            &base.ephemeral_storage_request,
        ),
        ephemeral_storage_limit: pick(&j.ephemeral_storage_limit, &base.ephemeral_storage_limit),
        ..base.clone()
    }
}

fn resources(r: &ResourceSettings) -> Option<ResourceRequirements> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (is_limit, key, q) in [
        (false, "cpu", &r.cpu_request),
        (false, "memory", &r.memory_request),
        (false, "ephemeral-storage", &r.ephemeral_storage_request),
        (true, "cpu", &r.cpu_limit),
        (true, "memory", &r.memory_limit),
        (true, "ephemeral-storage", &r.ephemeral_storage_limit),
    ] {
        if let Some(q) = q {
            let map = if is_limit { &mut limits } else { &mut requests };
            map.insert(key.to_string(), K8sQuantity(q.as_str().to_string()));
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return None;
    }
    Some(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

/// The container name of each of the job's services, in order: from its first alias, else its
/// image, made unique (`run` finds a service's container again with it).
#[must_use]
pub fn service_container_names(services: &[ImageSpec]) -> Vec<String> {
    let mut taken: Vec<String> = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let alias = svc.alias.split([' ', ',']).next().unwrap_or("");
        let name = naming::service_container_name(alias, &svc.name, i, &taken);
        taken.push(name);
    }
    taken
}

/// Host names a service answers to: its aliases and the Docker-style names derived from the image
/// (`registry/group/img:tag` → `group-img`, `group__img`), as gitlab-runner documents.
fn service_host_names(svc: &ImageSpec) -> Vec<String> {
    let mut names: Vec<String> = svc
        .alias
        .split([' ', ','])
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    let no_tag = svc.name.split('@').next().unwrap_or(&svc.name);
    let no_tag = match no_tag.rfind(':') {
        Some(i) if !no_tag[i..].contains('/') => &no_tag[..i],
        _ => no_tag,
    };
    let path = match no_tag.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => no_tag,
    };
    let path = path.strip_prefix("library/").unwrap_or(path);
    names.push(path.replace('/', "-"));
    names.push(path.replace('/', "__"));
    let mut out: Vec<String> = Vec::new();
    for n in names {
        let n = n.to_ascii_lowercase();
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if ok && !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// A service container: the job's public variables plus the service's own (which win), the build
/// volumes (as the Kubernetes executor mounts them in services: `DinD` certs, shared files), and its
/// last log lines as termination message when it fails, so `prepare` can report them without
/// `pods/log`.
fn service_container(
    settings: &Settings,
    input: &PlanInput<'_>,
    index: usize,
    name: String,
    mounts: &[VolumeMount],
    pull_policy: Option<String>,
    notes: &mut Vec<String>,
) -> Container {
    let svc = &input.job.services[index];
    let mut vars: Vec<(String, String)> = crate::job::service_job_variables(input.job, input.env);
    for (k, v) in crate::job::service_own_variables(input.job, input.env, index) {
        if !crate::job::is_env_name(&k) {
            continue;
        }
        vars.retain(|(ek, _)| *ek != k);
        vars.push((k, v));
    }
    let env: Vec<EnvVar> = vars
        .into_iter()
        .map(|(k, v)| EnvVar {
            name: k,
            // The kubelet expands `$(NAME)` and turns `$$` into `$` in env values: doubling every
            // `$` keeps the runner's value byte for byte.
            value: Some(v.replace('$', "$$")),
            value_from: None,
        })
        .collect();
    let entrypoint: Vec<String> = svc
        .entrypoint
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    Container {
        name,
        image: Some(svc.name.clone()),
        image_pull_policy: pull_policy,
        command: (!entrypoint.is_empty()).then_some(entrypoint),
        args: (!svc.command.is_empty()).then(|| svc.command.clone()),
        env: (!env.is_empty()).then_some(env),
        resources: resources(&merge_job_resources(
            &settings.resources.services,
            input
                .knobs
                .per_service
                .get(index)
                .unwrap_or(&input.knobs.service_resources),
        )),
        security_context: job_image_security(
            settings,
            settings.pod.service_security_context.as_ref(),
            "pod.service_security_context",
            svc,
            &svc.name,
            notes,
        ),
        volume_mounts: (!mounts.is_empty()).then(|| mounts.to_vec()),
        ports: service_ports(svc),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// The ports a service declares, as container ports (documentation for `kubectl`, and what
/// `prepare` waits for). GitLab's `protocol` (http/https) is about the web terminal proxy; the
/// socket is TCP either way. A name Kubernetes would refuse is left out.
fn service_ports(svc: &ImageSpec) -> Option<Vec<ContainerPort>> {
    let ports: Vec<ContainerPort> = svc
        .ports
        .iter()
        .filter_map(|p| {
            let number = i32::try_from(p.number)
                .ok()
                .filter(|n| (1..=65535).contains(n))?;
            let name = p.name.to_ascii_lowercase();
            let name_ok = !name.is_empty()
                && name.len() <= 15
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && name.bytes().any(|b| b.is_ascii_lowercase())
                && !name.starts_with('-')
                && !name.ends_with('-')
                && !name.contains("--");
            Some(ContainerPort {
                container_port: number,
                name: name_ok.then_some(name),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            })
        })
        .collect();
    (!ports.is_empty()).then_some(ports)
}

fn pod_labels(settings: &Settings, input: &PlanInput<'_>, name: &str) -> BTreeMap<String, String> {
    let job = input.job;
    let mut l: BTreeMap<String, String> = settings.pod.labels.clone();
    l.extend(input.knobs.labels.clone());
    // Ours are written last: operators cannot overwrite the keys cleanup and gc select on.
    for (k, v) in [
        (MANAGED_BY_KEY, MANAGED_BY_VALUE.to_string()),
        (POD_LABEL, name.to_string()),
        (KIND_LABEL, "job-pod".to_string()),
        (SPOT_POLICY_LABEL, input.spot.as_str().to_string()),
        ("job.runner.gitlab.com/id", job.id.to_string()),
        (
            "pipeline.runner.gitlab.com/id",
            job.job_info.pipeline_id.to_string(),
        ),
        (
            "project.runner.gitlab.com/id",
            job.job_info.project_id.to_string(),
        ),
        (
            "project.runner.gitlab.com/name",
            naming::label_value(&job.job_info.project_name),
        ),
        (
            "project.runner.gitlab.com/namespace-id",
            job.job_info.namespace_id.to_string(),
        ),
        (
            "project.runner.gitlab.com/root-namespace-id",
            job.job_info.root_namespace_id.to_string(),
        ),
        (
            "manager.runner.gitlab.com/id-short",
            naming::label_value(&input.identity.runner_short_token),
        ),
    ] {
        l.insert(k.to_string(), v);
    }
    l
}

fn pod_annotations(settings: &Settings, input: &PlanInput<'_>) -> BTreeMap<String, String> {
    let job = input.job;
    let mut a: BTreeMap<String, String> = settings.pod.annotations.clone();
    a.extend(input.knobs.annotations.clone());
    let url = input
        .env
        .get("CI_JOB_URL")
        .or_else(|| job.variable("CI_JOB_URL"))
        .unwrap_or("")
        .to_string();
    for (k, v) in [
        ("job.runner.gitlab.com/id", job.id.to_string()),
        ("job.runner.gitlab.com/url", url),
        ("job.runner.gitlab.com/sha", job.git_info.sha.clone()),
        (
            "job.runner.gitlab.com/before_sha",
            job.git_info.before_sha.clone(),
        ),
        ("job.runner.gitlab.com/ref", job.git_info.git_ref.clone()),
        ("job.runner.gitlab.com/name", job.job_info.name.clone()),
        (
            "job.runner.gitlab.com/timeout",
            format!("{}s", job_timeout(settings, input)),
        ),
        (
            "project.runner.gitlab.com/path",
            job.job_info.project_full_path.clone(),
        ),
    ] {
        a.insert(k.to_string(), v);
    }
    a
}

/// The job timeout in seconds: the payload's, else `CI_JOB_TIMEOUT`, else the operator default.
#[must_use]
pub fn job_timeout(settings: &Settings, input: &PlanInput<'_>) -> u64 {
    if input.job.runner_info.timeout > 0 {
        return input.job.runner_info.timeout;
    }
    input
        .env
        .get("CI_JOB_TIMEOUT")
        .and_then(|v| v.parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(settings.timeouts.default_job_timeout_seconds)
}

fn spot_toleration() -> Toleration {
    Toleration {
        key: Some(SPOT_LABEL.into()),
        operator: Some("Equal".into()),
        value: Some("true".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }
}

fn spot_requirement(operator: &str) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: SPOT_LABEL.into(),
        operator: operator.into(),
        values: Some(vec!["true".into()]),
    }
}

/// Node selector, affinity and tolerations for a spot policy plus the operator's own.
fn placement(
    settings: &Settings,
    knobs: &JobKnobs,
    spot: SpotPolicy,
) -> (BTreeMap<String, String>, Option<Affinity>, Vec<Toleration>) {
    let mut selector = settings.pod.node_selector.clone();
    // Allowed job overrides win over the operator's values, the spot policy over both.
    selector.extend(knobs.node_selector.clone());
    let mut tolerations: Vec<Toleration> = settings
        .pod
        .tolerations
        .iter()
        .map(|t| Toleration {
            key: Some(t.key.clone()),
            operator: Some(t.operator.clone()),
            value: if t.operator == "Exists" {
                None
            } else {
                t.value.clone()
            },
            effect: t.effect.clone(),
            ..Toleration::default()
        })
        .collect();
    let affinity = match spot {
        SpotPolicy::Require => {
            selector.insert(SPOT_LABEL.into(), "true".into());
            tolerations.push(spot_toleration());
            None
        }
        SpotPolicy::Prefer => {
            tolerations.push(spot_toleration());
            Some(NodeAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    PreferredSchedulingTerm {
                        weight: 100,
                        preference: NodeSelectorTerm {
                            match_expressions: Some(vec![spot_requirement("In")]),
                            ..NodeSelectorTerm::default()
                        },
                    },
                ]),
                ..NodeAffinity::default()
            })
        }
        SpotPolicy::Never => {
            selector.remove(SPOT_LABEL);
            Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![spot_requirement("NotIn")]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            })
        }
    };
    let affinity = affinity.map(|na| Affinity {
        node_affinity: Some(na),
        ..Affinity::default()
    });
    (selector, affinity, tolerations)
}

/// The helper image for the pod's architecture: `${ARCH}` and `${FLAVOR}` resolved. When the
/// image depends on the architecture, the pod is pinned to it (one helper image per pod: on a node
/// of another architecture the helper would not start, gitlab-runner#27421), and an arm64 pod
/// tolerates GKE's `kubernetes.io/arch=arm64:NoSchedule` taint on Arm nodes.
fn helper_image(
    settings: &Settings,
    selector: &mut BTreeMap<String, String>,
    tolerations: &mut Vec<Toleration>,
) -> Result<String, PlanError> {
    let template = &settings.images.helper_image;
    let arch = selector
        .get(ARCH_LABEL)
        .cloned()
        .unwrap_or_else(|| DEFAULT_ARCH.to_string());
    let mut image = template.clone();
    if template.contains("${ARCH}") {
        let tag_arch = helper_arch(&arch).ok_or_else(|| PlanError::UnsupportedArch {
            arch: arch.clone(),
            known: KNOWN_ARCHES.join(", "),
        })?;
        image = image.replace("${ARCH}", tag_arch);
        selector
            .entry(ARCH_LABEL.to_string())
            .or_insert_with(|| arch.clone());
    }
    let flavor = settings
        .images
        .helper_image_flavor
        .as_ref()
        .map(|f| format!("{f}-"))
        .unwrap_or_default();
    image = image.replace("${FLAVOR}", &flavor);
    if selector.get(ARCH_LABEL).map(String::as_str) == Some("arm64")
        && !tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some(ARCH_LABEL))
    {
        tolerations.push(Toleration {
            key: Some(ARCH_LABEL.into()),
            operator: Some("Equal".into()),
            value: Some("arm64".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
    }
    Ok(image)
}

/// Puts the spot placement back after the operator's `pod.patch`: a patch that sets `affinity`
/// (or `tolerations`, `nodeSelector`) replaces lists wholesale under merge and strategic rules,
/// which would silently drop the spot terms. Ours are added to what the patch left: the spot
/// requirement is added (AND) to every required node selector term, the spot preference appended.
fn keep_spot_placement(pod: &mut Pod, spot: SpotPolicy) {
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    if spot != SpotPolicy::Never && !tolerations.contains(&spot_toleration()) {
        tolerations.push(spot_toleration());
    }
    if tolerations.is_empty() {
        spec.tolerations = None;
    }
    match spot {
        SpotPolicy::Require => {
            spec.node_selector
                .get_or_insert_with(BTreeMap::new)
                .insert(SPOT_LABEL.into(), "true".into());
        }
        SpotPolicy::Prefer => {
            let na = spec
                .affinity
                .get_or_insert_with(Affinity::default)
                .node_affinity
                .get_or_insert_with(NodeAffinity::default);
            let preferred = na
                .preferred_during_scheduling_ignored_during_execution
                .get_or_insert_with(Vec::new);
            let ours = PreferredSchedulingTerm {
                weight: 100,
                preference: NodeSelectorTerm {
                    match_expressions: Some(vec![spot_requirement("In")]),
                    ..NodeSelectorTerm::default()
                },
            };
            if !preferred.contains(&ours) {
                preferred.push(ours);
            }
        }
        SpotPolicy::Never => {
            if let Some(sel) = spec.node_selector.as_mut() {
                sel.remove(SPOT_LABEL);
            }
            let na = spec
                .affinity
                .get_or_insert_with(Affinity::default)
                .node_affinity
                .get_or_insert_with(NodeAffinity::default);
            let required = na
                .required_during_scheduling_ignored_during_execution
                .get_or_insert_with(|| NodeSelector {
                    node_selector_terms: Vec::new(),
                });
            if required.node_selector_terms.is_empty() {
                required
                    .node_selector_terms
                    .push(NodeSelectorTerm::default());
            }
            // Terms are ORed: each one must exclude spot nodes.
            for term in &mut required.node_selector_terms {
                let exprs = term.match_expressions.get_or_insert_with(Vec::new);
                if !exprs.contains(&spot_requirement("NotIn")) {
                    exprs.push(spot_requirement("NotIn"));
                }
            }
        }
    }
}

/// A dockerconfigjson Secret from the job's registry credentials and `DOCKER_AUTH_CONFIG`.
fn registry_secret(
    input: &PlanInput<'_>,
    pod_name: &str,
    pod_labels: &BTreeMap<String, String>,
) -> Option<Secret> {
    let mut auths = serde_json::Map::new();
    if let Some(cfg) = input
        .env
        .get("DOCKER_AUTH_CONFIG")
        .or_else(|| input.job.variable("DOCKER_AUTH_CONFIG"))
    {
        if let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str::<serde_json::Value>(cfg)
        {
            if let Some(serde_json::Value::Object(a)) = o.remove("auths") {
                auths.extend(a);
            }
        }
    }
    for c in input
        .job
        .credentials
        .iter()
        .filter(|c| c.kind == "registry" && !c.url.is_empty())
    {
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        auths.entry(c.url.clone()).or_insert_with(
            || serde_json::json!({ "username": c.username, "password": c.password, "auth": auth }),
        );
    }
    if auths.is_empty() {
        return None;
    }
    let doc = serde_json::json!({ "auths": auths });
    let mut labels = BTreeMap::new();
    for k in [MANAGED_BY_KEY, POD_LABEL, "job.runner.gitlab.com/id"] {
        if let Some(v) = pod_labels.get(k) {
            labels.insert(k.to_string(), v.clone());
        }
    }
    labels.insert(KIND_LABEL.into(), "registry".into());
    Some(Secret {
        metadata: ObjectMeta {
            name: Some(naming::secret_name(pod_name)),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(doc.to_string().into_bytes()),
        )])),
        ..Secret::default()
    })
}

fn apply_patch(settings: &Settings, pod: Pod) -> Result<Pod, PlanError> {
    let Some(p) = &settings.pod.patch else {
        return Ok(pod);
    };
    let mut doc = serde_json::to_value(&pod).map_err(|e| PlanError::Patch(e.to_string()))?;
    let patch: serde_json::Value =
        serde_json::from_str(&p.patch).map_err(|e| PlanError::Patch(e.to_string()))?;
    match p.patch_type {
        PatchType::Merge => json_patch::merge(&mut doc, &patch),
        PatchType::Strategic => {
            crate::smp::apply(&mut doc, &patch).map_err(|e| PlanError::Patch(e.to_string()))?;
        }
        PatchType::Json => {
            let ops: json_patch::Patch =
                serde_json::from_value(patch).map_err(|e| PlanError::Patch(e.to_string()))?;
            json_patch::patch(&mut doc, &ops).map_err(|e| PlanError::Patch(e.to_string()))?;
        }
    }
    let patched: Pod = serde_json::from_value(doc)
        .map_err(|e| PlanError::Patch(format!("result is not a Pod: {e}")))?;
    if patched.metadata.name != pod.metadata.name
        || patched
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_KEY))
            != Some(&MANAGED_BY_VALUE.to_string())
    {
        return Err(PlanError::Patch(
            "may not change the pod name or the managed-by label".into(),
        ));
    }
    Ok(patched)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
