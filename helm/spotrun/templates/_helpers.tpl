{{/* Names, labels and shared fragments. Every define is namespaced with "spotrun." */}}

{{- define "spotrun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fullname, truncated so that "<fullname>-cache-proxy-gc" still fits 63 characters. */}}
{{- define "spotrun.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "spotrun.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: immutable ones only. Call with (dict "ctx" $ "component" "x"). */}}
{{- define "spotrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spotrun.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Full label set. Call with (dict "ctx" $ "component" "x"). */}}
{{- define "spotrun.labels" -}}
helm.sh/chart: {{ include "spotrun.chart" .ctx }}
{{ include "spotrun.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: spotrun
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The namespace job pods run in: executor.config.namespace, else runners.jobNamespace, else the release's. */}}
{{- define "spotrun.jobNamespace" -}}
{{- coalesce .Values.executor.config.namespace .Values.runners.jobNamespace .Release.Namespace }}
{{- end }}

{{/* Object names. */}}
{{- define "spotrun.manager.fullname" -}}{{ include "spotrun.fullname" . }}-manager{{- end }}
{{- define "spotrun.proxy.fullname" -}}{{ include "spotrun.fullname" . }}-cache-proxy{{- end }}
{{- define "spotrun.gc.fullname" -}}{{ include "spotrun.fullname" . }}-gc{{- end }}
{{- define "spotrun.backup.fullname" -}}{{ include "spotrun.fullname" . }}-backup{{- end }}

{{/* The cache proxy Service name; the runner's ServerAddress is "<this>.<ns>.svc:<port>". */}}
{{- define "spotrun.proxy.serviceName" -}}{{ include "spotrun.fullname" . }}-cache{{- end }}
{{/* The proxy's S3 URL scheme: https when cacheProxy.tls.enabled. */}}
{{- define "spotrun.proxy.scheme" -}}{{ ternary "https" "http" .Values.cacheProxy.tls.enabled }}{{- end }}
{{- define "spotrun.proxy.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "spotrun.proxy.fullname" .)) .Values.cacheProxy.tls.secretName }}
{{- end }}

{{- define "spotrun.proxy.address" -}}
{{- printf "%s.%s.svc:%d" (include "spotrun.proxy.serviceName" .) .Release.Namespace (int .Values.cacheProxy.service.port) }}
{{- end }}

{{- define "spotrun.manager.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spotrun.manager.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spotrun.proxy.serviceAccountName" -}}
{{- if .Values.cacheProxy.serviceAccount.create }}
{{- default (include "spotrun.proxy.fullname" .) .Values.cacheProxy.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.cacheProxy.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spotrun.gc.serviceAccountName" -}}
{{- if .Values.executor.gc.serviceAccount.create }}
{{- default (include "spotrun.gc.fullname" .) .Values.executor.gc.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.executor.gc.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the runner authentication token (key "runner-token"), as in the official chart. */}}
{{- define "spotrun.runnerSecretName" -}}
{{- default (printf "%s-runner-token" (include "spotrun.fullname" .)) (tpl .Values.runners.secret .) }}
{{- end }}

{{/* The Secret holding the cache access key pair (keys "accesskey" and "secretkey"), as in the official chart. */}}
{{- define "spotrun.objectStorageSecretName" -}}
{{- default (printf "%s-gitlab-object-storage" (include "spotrun.fullname" .)) .Values.objectStorage.secretName }}
{{- end }}

{{- define "spotrun.backupSecretName" -}}{{ include "spotrun.fullname" . }}-backup-credentials{{- end }}

{{- define "spotrun.cacheSecretName" -}}
{{- default (printf "%s-cache-credentials" (include "spotrun.fullname" .)) (tpl .Values.runners.cache.secretName .) }}
{{- end }}

{{/* Images. */}}
{{- define "spotrun.runnerImage" -}}
{{- $img := .Values.image }}
{{- if $img.registry }}{{ printf "%s/%s:%s" $img.registry $img.image $img.tag }}{{ else }}{{ printf "%s:%s" $img.image $img.tag }}{{ end }}
{{- end }}

{{- define "spotrun.spotrunImage" -}}
{{- printf "%s:%s" .Values.spotrun.image.repository (default .Chart.AppVersion .Values.spotrun.image.tag) }}
{{- end }}

{{- define "spotrun.proxyImage" -}}
{{- $repo := default .Values.spotrun.image.repository .Values.cacheProxy.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.spotrun.image.tag) .Values.cacheProxy.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Paths inside the pods. */}}
{{- define "spotrun.executorBinary" -}}/opt/spotrun/bin/spotrun-executor{{- end }}
{{- define "spotrun.executorConfigPath" -}}/etc/spotrun/executor.toml{{- end }}
{{- define "spotrun.proxyConfigPath" -}}/etc/spotrun/cache-proxy.toml{{- end }}

{{/* A TOML string literal. JSON string escapes (\", \\, \n, \uXXXX) are all valid TOML escapes. */}}
{{- define "spotrun.toml.string" -}}{{ toJson (toString .) }}{{- end }}

{{/* A TOML key: bare when it can be, quoted otherwise. */}}
{{- define "spotrun.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
A TOML scalar or array of scalars. Helm 4 reads YAML numbers as float64 (whole numbers are
printed as integers because our programs' settings are integers; toToml would print 3600.0);
Helm 3 reads values files into json.Number, a string kind holding the number's literal text.
*/}}
{{- define "spotrun.toml.value" -}}
{{- $v := . }}
{{- if typeIs "json.Number" $v }}{{ toString $v }}
{{- else if kindIs "string" $v }}{{ include "spotrun.toml.string" $v }}
{{- else if kindIs "bool" $v }}{{ ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) }}{{ $v }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "spotrun.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v }}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "spotrun.toml.key" $k }} = {{ include "spotrun.toml.value" (get $v $k) }}{{ end }} }
{{- else }}{{ fail (printf "spotrun: cannot render %v (%s) as TOML" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* True when a value is a list whose items are all maps (rendered as [[array.of.tables]]). */}}
{{- define "spotrun.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}
{{- $all := true }}
{{- range . }}{{ if not (kindIs "map" .) }}{{ $all = false }}{{ end }}{{ end }}
{{- if $all }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Render a map as a TOML document. Call with (dict "path" "" "table" $map).
Scalars and arrays first, then sub-tables and arrays of tables, keys sorted; null values are
omitted, so an operator can unset a key with `key: null`.
*/}}
{{- define "spotrun.toml.table" -}}
{{- $path := .path }}
{{- $t := .table }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := get $t $k }}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) (not (include "spotrun.toml.isTableArray" $v)) }}
{{ include "spotrun.toml.key" $k }} = {{ include "spotrun.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := get $t $k }}
{{- $sub := ternary (include "spotrun.toml.key" $k) (printf "%s.%s" $path (include "spotrun.toml.key" $k)) (eq $path "") }}
{{- if kindIs "map" $v }}

[{{ $sub }}]
{{- include "spotrun.toml.table" (dict "path" $sub "table" $v) }}
{{- else if include "spotrun.toml.isTableArray" $v }}
{{- range $e := $v }}

[[{{ $sub }}]]
{{- include "spotrun.toml.table" (dict "path" $sub "table" $e) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level scheduling block shared by the Deployments and CronJobs. Call with a values map. */}}
{{- define "spotrun.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The restricted container securityContext every spotrun container uses. */}}
{{- define "spotrun.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
