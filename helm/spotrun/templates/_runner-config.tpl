{{/* gitlab-runner config.toml for the manager; secrets are @@PLACEHOLDERS@@ (see files/manager-entrypoint.sh). */}}
{{- define "spotrun.runnerConfig" -}}
{{- $exe := include "spotrun.executorBinary" . -}}
{{- $cfg := include "spotrun.executorConfigPath" . -}}
{{- $c := .Values.runners.custom -}}
concurrent = {{ int .Values.concurrent }}
check_interval = {{ int .Values.checkInterval }}
log_level = {{ include "spotrun.toml.string" .Values.logLevel }}
log_format = {{ include "spotrun.toml.string" .Values.logFormat }}
shutdown_timeout = {{ int .Values.shutdownTimeout }}
{{- if .Values.metrics.enabled }}
listen_address = {{ include "spotrun.toml.string" (printf ":%d" (int .Values.metrics.port)) }}
{{- end }}

[[runners]]
  name = {{ include "spotrun.toml.string" .Values.runners.name }}
  url = {{ include "spotrun.toml.string" .Values.gitlabUrl }}
  token = "@@RUNNER_TOKEN@@"
  executor = "custom"
  shell = {{ include "spotrun.toml.string" .Values.runners.shell }}
  builds_dir = "/builds"
  cache_dir = "/cache"
  output_limit = {{ int .Values.runners.outputLimit }}
  limit = {{ int .Values.runners.limit }}
  request_concurrency = {{ int .Values.runners.requestConcurrency }}
  environment = {{ include "spotrun.toml.value" .Values.runners.environment }}
{{- with .Values.runners.config }}
{{ tpl . $ | indent 2 }}
{{- end }}
  [runners.custom]
    config_exec = {{ include "spotrun.toml.string" $exe }}
    config_args = ["--config", {{ include "spotrun.toml.string" $cfg }}, "config"]
    config_exec_timeout = {{ int $c.configExecTimeout }}
    prepare_exec = {{ include "spotrun.toml.string" $exe }}
    prepare_args = ["--config", {{ include "spotrun.toml.string" $cfg }}, "prepare"]
    prepare_exec_timeout = {{ int $c.prepareExecTimeout }}
    run_exec = {{ include "spotrun.toml.string" $exe }}
    run_args = ["--config", {{ include "spotrun.toml.string" $cfg }}, "run"]
    cleanup_exec = {{ include "spotrun.toml.string" $exe }}
    cleanup_args = ["--config", {{ include "spotrun.toml.string" $cfg }}, "cleanup"]
    cleanup_exec_timeout = {{ int $c.cleanupExecTimeout }}
    graceful_kill_timeout = {{ int $c.gracefulKillTimeout }}
    force_kill_timeout = {{ int $c.forceKillTimeout }}
{{- if .Values.runners.cache.enabled }}
{{- $cache := .Values.runners.cache }}
  [runners.cache]
    Type = "s3"
    Path = {{ include "spotrun.toml.string" $cache.path }}
    Shared = {{ ternary "true" "false" $cache.shared }}
    MaxUploadedArchiveSize = {{ int64 $cache.maxUploadedArchiveSize }}
    [runners.cache.s3]
      ServerAddress = {{ include "spotrun.toml.string" (include "spotrun.proxy.address" .) }}
      AccessKey = "@@CACHE_S3_ACCESS_KEY@@"
      SecretKey = "@@CACHE_S3_SECRET_KEY@@"
      AuthenticationType = "access-key"
      BucketName = {{ include "spotrun.toml.string" $cache.bucketName }}
      BucketLocation = {{ include "spotrun.toml.string" $cache.bucketLocation }}
      Insecure = {{ ternary "false" "true" .Values.cacheProxy.tls.enabled }}
      PathStyle = true
{{- end }}
{{- end }}

{{/* executor.toml: executor.config verbatim, with the job namespace filled in when unset. */}}
{{- define "spotrun.executorConfig" -}}
{{- $cfg := deepCopy .Values.executor.config }}
{{- if not (get $cfg "namespace") }}
{{- $_ := set $cfg "namespace" (include "spotrun.jobNamespace" .) }}
{{- end }}
{{- /* Job pods copy spotrun-launch from the image this chart runs, mirror included. */}}
{{- $images := deepCopy (default (dict) (get $cfg "images")) }}
{{- if not (get $images "launcher_image") }}
{{- $_ := set $images "launcher_image" (include "spotrun.spotrunImage" .) }}
{{- end }}
{{- $_ := set $cfg "images" $images }}
# spotrun-executor settings (rendered by the spotrun chart from executor.config).
{{- include "spotrun.toml.table" (dict "path" "" "table" $cfg) }}
{{- end }}
