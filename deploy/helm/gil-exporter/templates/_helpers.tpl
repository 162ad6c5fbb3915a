{{/* Chart name, truncated to 63 characters. */}}
{{- define "gil-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-gil-exporter unless the release already contains it. */}}
{{- define "gil-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gil-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gil-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gil-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gil-exporter.labels" -}}
helm.sh/chart: {{ include "gil-exporter.chart" . }}
{{ include "gil-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: exporter
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "gil-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gil-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gil-exporter.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The exporter's config file, as YAML. */}}
{{- define "gil-exporter.config" -}}
{{ toYaml .Values.config }}
{{- end }}

{{/* Command-line arguments of the exporter container. */}}
{{- define "gil-exporter.args" -}}
- --config=/etc/gil-exporter/config.yaml
- --web.listen-address={{ .Values.listenAddress | default (printf ":%d" (int .Values.port)) }}
- --log.level={{ .Values.logLevel }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Relabelings for scraping the DaemonSet. The exporter's per-process series carry the
*monitored* pod's namespace / pod / container; the operator would otherwise attach the
*exporter's* own namespace/pod/container as target labels (and rename ours to exported_*),
and would stamp the exporter's pod onto processes that run outside any pod. So drop those
target labels and add the node name instead.
*/}}
{{- define "gil-exporter.relabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
- action: labeldrop
  regex: (namespace|pod|container|service|endpoint)
{{- end }}
