{{/*
cache-proxy.toml: cacheProxy.config verbatim, with the settings the chart owns (listen addresses,
buckets, backend, spool and data paths) filled in from values when cacheProxy.config leaves them unset.
Secrets never appear here: the proxy reads them from the environment (see cache-proxy-deployment.yaml).
*/}}
{{- define "spotrun.proxyConfig" -}}
{{- $v := .Values.cacheProxy }}
{{- $b := $v.backend }}
{{- /* One key pair per client, each confined to its buckets: the runner to the cache, GitLab to its
object storage buckets, the backup job to the backup bucket. Their secrets reach the proxy as env. */}}
{{- $buckets := list .Values.runners.cache.bucketName }}
{{- $durable := list }}
{{- $keys := list (dict "id_env" "SPOTRUN_RUNNER_ACCESS_KEY" "secret_env" "SPOTRUN_RUNNER_SECRET_KEY" "bucket" .Values.runners.cache.bucketName) }}
{{- if .Values.objectStorage.enabled }}
{{- $buckets = concat $buckets .Values.objectStorage.buckets | uniq }}
{{- $durable = concat $durable .Values.objectStorage.buckets | uniq }}
{{- $keys = append $keys (dict "id_env" "SPOTRUN_GITLAB_ACCESS_KEY" "secret_env" "SPOTRUN_GITLAB_SECRET_KEY" "buckets" .Values.objectStorage.buckets) }}
{{- end }}
{{- if .Values.backup.enabled }}
{{- $buckets = append $buckets .Values.backup.bucketName | uniq }}
{{- $durable = append $durable .Values.backup.bucketName | uniq }}
{{- $keys = append $keys (dict "id_env" "SPOTRUN_BACKUP_ACCESS_KEY" "secret_env" "SPOTRUN_BACKUP_SECRET_KEY" "bucket" .Values.backup.bucketName) }}
{{- end }}
{{- $defaults := dict "listen" (printf "0.0.0.0:%d" (int $v.service.port)) "ops_listen" (printf "0.0.0.0:%d" (int $v.service.opsPort)) "region" .Values.runners.cache.bucketLocation "buckets" $buckets "access_keys" $keys }}
{{- if $durable }}{{ $_ := set $defaults "durable_buckets" $durable }}{{ end }}
{{- if $v.tls.enabled }}
{{- /* A kubernetes.io/tls Secret; the proxy re-reads renewed files without a restart. */}}
{{- $_ := set $defaults "tls" (dict "cert_file" "/etc/spotrun-tls/tls.crt" "key_file" "/etc/spotrun-tls/tls.key") }}
{{- end }}
{{- if eq $b.type "disk" }}
{{- /* Uploads spool on the data volume (<path>/.spool), the proxy's default. */}}
{{- $_ := set $defaults "store" (dict "kind" "disk" "path" "/data") }}
{{- else if eq $b.type "s3" }}
{{- $_ := set $defaults "spool_dir" "/spool" }}
{{- $store := dict "kind" "s3" "endpoint" $b.s3.endpoint "region" $b.s3.region "bucket" $b.s3.bucket "path_style" $b.s3.pathStyle }}
{{- with $b.s3.prefix }}{{ $_ := set $store "prefix" . }}{{ end }}
{{- $_ := set $defaults "store" $store }}
{{- else if eq $b.type "gcs" }}
{{- $_ := set $defaults "spool_dir" "/spool" }}
{{- $store := dict "kind" "gcs" "bucket" $b.gcs.bucket }}
{{- with $b.gcs.prefix }}{{ $_ := set $store "prefix" . }}{{ end }}
{{- /* Without HMAC keys the proxy takes OAuth tokens from the GKE metadata server (Workload Identity). */}}
{{- if not $b.gcs.hmacSecret }}{{ $_ := set $store "credentials" "gce-metadata" }}{{ end }}
{{- $_ := set $defaults "store" $store }}
{{- end }}
{{- if $v.gc.enabled }}
{{- /* The CronJob collects garbage; the in-server timer is off unless set explicitly. */}}
{{- $_ := set $defaults "gc" (dict "interval_secs" 0) }}
{{- end }}
{{- $cfg := mergeOverwrite $defaults (deepCopy $v.config) }}
# spotrun-cache-proxy settings (rendered by the spotrun chart from cacheProxy.*). Client key pairs come
# from the env variables named by access_keys (Secrets), backend keys from AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY, never from this file.
{{- include "spotrun.toml.table" (dict "path" "" "table" $cfg) }}
{{- end }}

{{/* Backend validation shared by the proxy templates. */}}
{{- define "spotrun.proxyValidate" -}}
{{- $b := .Values.cacheProxy.backend }}
{{- if eq $b.type "s3" }}
{{- if not $b.s3.endpoint }}{{ fail "cacheProxy.backend.s3.endpoint is required when cacheProxy.backend.type is s3" }}{{ end }}
{{- if not $b.s3.bucket }}{{ fail "cacheProxy.backend.s3.bucket is required when cacheProxy.backend.type is s3" }}{{ end }}
{{- if not $b.s3.existingSecret }}{{ fail "cacheProxy.backend.s3.existingSecret is required when cacheProxy.backend.type is s3" }}{{ end }}
{{- else if eq $b.type "gcs" }}
{{- if not $b.gcs.bucket }}{{ fail "cacheProxy.backend.gcs.bucket is required when cacheProxy.backend.type is gcs" }}{{ end }}
{{- if and (not $b.gcs.hmacSecret) (not $b.gcs.workloadIdentityServiceAccount) }}
{{- fail "cacheProxy.backend.gcs needs hmacSecret (interop HMAC keys) or workloadIdentityServiceAccount" }}
{{- end }}
{{- else if eq $b.type "disk" }}
{{- if .Values.cacheProxy.hpa.enabled }}{{ fail "cacheProxy.hpa.enabled needs a shared backend (s3 or gcs): a disk backend runs one replica" }}{{ end }}
{{- end }}
{{- end }}

{{/* Replicas of the proxy Deployment: one with a ReadWriteOnce disk. */}}
{{- define "spotrun.proxyReplicas" -}}
{{- if eq .Values.cacheProxy.backend.type "disk" }}1{{ else }}{{ .Values.cacheProxy.replicas }}{{ end }}
{{- end }}

{{/* Environment of every proxy container: front credentials and backend credentials. */}}
{{- define "spotrun.proxyEnv" -}}
{{- $b := .Values.cacheProxy.backend -}}
{{- range $k := list (list "RUNNER" (include "spotrun.cacheSecretName" .) true) (list "GITLAB" (include "spotrun.objectStorageSecretName" .) .Values.objectStorage.enabled) (list "BACKUP" (include "spotrun.backupSecretName" .) .Values.backup.enabled) }}
{{- if index $k 2 }}
- name: SPOTRUN_{{ index $k 0 }}_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ index $k 1 }}
      key: accesskey
- name: SPOTRUN_{{ index $k 0 }}_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ index $k 1 }}
      key: secretkey
{{- end }}
{{- end }}
{{- if eq $b.type "s3" }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $b.s3.existingSecret }}
      key: {{ $b.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $b.s3.existingSecret }}
      key: {{ $b.s3.secretAccessKeyKey }}
{{- else if and (eq $b.type "gcs") $b.gcs.hmacSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $b.gcs.hmacSecret }}
      key: {{ $b.gcs.accessIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $b.gcs.hmacSecret }}
      key: {{ $b.gcs.secretKey }}
{{- end }}
{{- end }}

{{/* Volumes of every proxy pod. */}}
{{- define "spotrun.proxyVolumes" -}}
- name: config
  configMap:
    name: {{ include "spotrun.proxy.fullname" . }}
{{- if ne .Values.cacheProxy.backend.type "disk" }}
- name: spool
  emptyDir:
    sizeLimit: {{ .Values.cacheProxy.spool.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.cacheProxy.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "spotrun.proxy.tlsSecretName" . }}
{{- end }}
{{- if eq .Values.cacheProxy.backend.type "disk" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ default (include "spotrun.proxy.fullname" .) .Values.cacheProxy.backend.disk.existingClaim }}
{{- end }}
{{- end }}

{{- define "spotrun.proxyVolumeMounts" -}}
- name: config
  mountPath: /etc/spotrun
  readOnly: true
{{- if ne .Values.cacheProxy.backend.type "disk" }}
- name: spool
  mountPath: /spool
{{- end }}
- name: tmp
  mountPath: /tmp
{{- if .Values.cacheProxy.tls.enabled }}
- name: tls
  mountPath: /etc/spotrun-tls
  readOnly: true
{{- end }}
{{- if eq .Values.cacheProxy.backend.type "disk" }}
- name: data
  mountPath: /data
{{- end }}
{{- end }}
