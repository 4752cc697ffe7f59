{{/*
Parses files/executor-rbac-rules.txt (one "<verb> <resource>[/<subresource>]" per line; "#" comments
and blank lines ignored; a resource may carry its API group as "<resource>.<group>") into RBAC rules,
one rule per resource in order of first appearance. Returns JSON {"namespaced": [...], "cluster": [...]}:
cluster-scoped resources (nodes, namespaces) cannot go in a Role.
*/}}
{{- define "spotrun.executorRbacRules" -}}
{{- $clusterScoped := list "nodes" "namespaces" "persistentvolumes" }}
{{- $verbs := dict }}
{{- $order := list }}
{{- $allowedVerbs := list "get" "list" "watch" "create" "update" "patch" "delete" "deletecollection" }}
{{- range $n, $raw := splitList "\n" (.Files.Get "files/executor-rbac-rules.txt") }}
{{- $line := trim (regexReplaceAll "#.*$" $raw "") }}
{{- if $line }}
{{- $f := regexSplit "\\s+" $line -1 }}
{{- if ne (len $f) 2 }}
{{- fail (printf "files/executor-rbac-rules.txt line %d: want \"<verb> <resource>[/<subresource>]\", got %q" (add1 $n) $raw) }}
{{- end }}
{{- $verb := index $f 0 }}
{{- $res := index $f 1 }}
{{- if not (has $verb $allowedVerbs) }}
{{- fail (printf "files/executor-rbac-rules.txt line %d: unknown verb %q" (add1 $n) $verb) }}
{{- end }}
{{- if or (contains "*" $res) (not (regexMatch "^[a-z0-9.-]+(/[a-z0-9-]+)?$" $res)) }}
{{- fail (printf "files/executor-rbac-rules.txt line %d: bad resource %q (no wildcards)" (add1 $n) $res) }}
{{- end }}
{{- if not (hasKey $verbs $res) }}
{{- $_ := set $verbs $res list }}
{{- $order = append $order $res }}
{{- end }}
{{- if not (has $verb (get $verbs $res)) }}
{{- $_ := set $verbs $res (append (get $verbs $res) $verb) }}
{{- end }}
{{- end }}
{{- end }}
{{- $ns := list }}
{{- $cluster := list }}
{{- range $res := $order }}
{{- $parts := splitList "/" $res }}
{{- $base := index $parts 0 }}
{{- $group := "" }}
{{- if contains "." $base }}
{{- $group = regexReplaceAll "^[^.]*\\." $base "" }}
{{- $base = regexReplaceAll "\\..*$" $base "" }}
{{- end }}
{{- $name := $base }}
{{- if gt (len $parts) 1 }}{{ $name = printf "%s/%s" $base (index $parts 1) }}{{ end }}
{{- $rule := dict "apiGroups" (list $group) "resources" (list $name) "verbs" (get $verbs $res) }}
{{- if has $base $clusterScoped }}
{{- $cluster = append $cluster $rule }}
{{- else }}
{{- $ns = append $ns $rule }}
{{- end }}
{{- end }}
{{- toJson (dict "namespaced" $ns "cluster" $cluster) }}
{{- end }}
