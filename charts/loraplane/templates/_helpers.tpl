{{/* Names, labels and the per-pool settings the templates share. */}}

{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-loraplane, or the release name when it contains the chart
name; 40 characters at most so that "-operator-cleanup" and pool names
still fit in 63. */}}
{{- define "loraplane.fullname" -}}
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

{{- define "loraplane.labels" -}}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "loraplane.metaLabels" . }}
{{- end }}

{{/* The labels besides name and instance (pod templates add these to
their selector labels). */}}
{{- define "loraplane.metaLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplane
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "loraplane.operatorSelector" -}}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "loraplane.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "loraplane.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "loraplane.adminTokenSecret" -}}
{{- default (printf "%s-admin-token" (include "loraplane.fullname" .)) .Values.agent.adminToken.existingSecret }}
{{- end }}

{{/* The container security context of every loraplane container: non-root,
read-only root filesystem, no capabilities, RuntimeDefault seccomp. */}}
{{- define "loraplane.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "loraplane.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A pool with poolDefaults under it (maps merge, the pool's values win),
as YAML: include "loraplane.pool" (dict "root" $ "pool" .) | fromYaml */}}
{{- define "loraplane.pool" -}}
{{- $pool := mustMergeOverwrite (deepCopy .root.Values.poolDefaults) (deepCopy .pool) }}
{{- toYaml $pool }}
{{- end }}

{{- define "loraplane.poolName" -}}
{{- printf "%s-%s" (include "loraplane.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels the operator finds agent pods by (docs/operator.md): the
first 8 hex of sha256(baseModelName). */}}
{{- define "loraplane.poolSelector" -}}
app.kubernetes.io/name: {{ include "loraplane.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: agent
loraplane.io/pool: {{ .pool.name }}
{{- end }}

{{- define "loraplane.baseModelHash" -}}
{{- sha256sum .baseModelName | trunc 8 }}
{{- end }}

{{- define "loraplane.agentImage" -}}
{{- $img := .root.Values.agent.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- if eq .pool.device "cuda" }}{{ $tag = printf "%s-cuda" $tag }}{{ end }}
{{- with .pool.image }}
{{- $img = mustMergeOverwrite (deepCopy $img) . }}
{{- if .tag }}{{ $tag = .tag }}{{ end }}
{{- end }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}

{{/* The path of the model inside the agent container, by source. */}}
{{- define "loraplane.modelPath" -}}
{{- $m := .model }}
{{- if $m.pvc }}
{{- printf "/models/%s" (default "" $m.pvc.path) | trimSuffix "/" }}
{{- else if $m.hostPath }}
{{- printf "/models/%s" (base $m.hostPath.path) }}
{{- else }}
{{- "/models/base" }}
{{- end }}
{{- end }}

{{/* Engine flags from a map: --name=value, true adds --name, false and
null leave it out, a list repeats the flag; sorted by name so renders are
stable. */}}
{{- define "loraplane.engineArgs" -}}
{{- range $k, $v := . }}
{{- if kindIs "bool" $v }}
{{- if $v }}
- --{{ $k }}
{{- end }}
{{- else if kindIs "slice" $v }}
{{- range $v }}
- {{ printf "--%s=%v" $k . | quote }}
{{- end }}
{{- else if and (kindIs "float64" $v) (eq $v (floor $v)) }}
- {{ printf "--%s=%d" $k (int64 $v) | quote }}
{{- else if not (kindIs "invalid" $v) }}
- {{ printf "--%s=%v" $k $v | quote }}
{{- end }}
{{- end }}
{{- end }}
