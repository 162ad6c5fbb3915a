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
{{- if include "gil-exporter.webConfigSecret" . }}
- --web.config.file=/etc/gil-exporter-web/{{ .Values.webConfig.key }}
{{- end }}
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

{{/*
Web config (--web.config.file): the Secret that holds it, empty when there is none. Either the
user's webConfig.existingSecret or the chart's <fullname>-web-config made from webConfig.config.
*/}}
{{- define "gil-exporter.webConfigSecret" -}}
{{- $w := .Values.webConfig }}
{{- if and $w.existingSecret $w.config }}
{{- fail "webConfig: set existingSecret or config, not both" }}
{{- end }}
{{- if $w.existingSecret }}
{{- $w.existingSecret }}
{{- else if $w.config }}
{{- /* The chart's Secret holds the web config alone: the files it names must come from elsewhere. */}}
{{- range $key, $file := ($w.config.tls_server_config | default dict) }}
{{- if and (has $key (list "cert_file" "key_file" "client_ca_file")) $file }}
{{- if not (isAbs $file) }}
{{- fail (printf "webConfig.config.tls_server_config.%s: %q is relative to the web config, which is alone in its Secret: name it by absolute path, e.g. /etc/gil-exporter-tls/tls.crt with webConfig.tlsSecret" $key $file) }}
{{- end }}
{{- if and (hasPrefix "/etc/gil-exporter-tls/" $file) (not $w.tlsSecret) }}
{{- fail (printf "webConfig.config.tls_server_config.%s is under /etc/gil-exporter-tls: set webConfig.tlsSecret, the Secret mounted there" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- printf "%s-web-config" (include "gil-exporter.fullname" .) }}
{{- end }}
{{- end }}

{{/*
What the web config serves: "none" (plain HTTP), "tls", or "mtls" (a client certificate
required). Derived from an inline webConfig.config; an existingSecret cannot be read at render
time, so webConfig.tls must say it. The probes and the monitors' default scheme follow it.
*/}}
{{- define "gil-exporter.webTLS" -}}
{{- $w := .Values.webConfig }}
{{- $derived := "none" }}
{{- with $w.config }}
{{- with .tls_server_config }}
{{- $derived = "tls" }}
{{- if has (.client_auth_type | default "NoClientCert") (list "RequireAnyClientCert" "RequireAndVerifyClientCert") }}
{{- $derived = "mtls" }}
{{- end }}
{{- end }}
{{- end }}
{{- if $w.tls }}
{{- if and $w.config (ne $w.tls $derived) }}
{{- fail (printf "webConfig.tls is %q but webConfig.config serves %q: leave webConfig.tls empty with an inline config" $w.tls $derived) }}
{{- end }}
{{- $w.tls }}
{{- else if $w.existingSecret }}
{{- fail "webConfig.existingSecret: set webConfig.tls to none, tls or mtls (what the Secret's web config serves; the chart cannot read it)" }}
{{- else }}
{{- $derived }}
{{- end }}
{{- end }}

{{/*
A liveness/readiness probe as the web config lets the kubelet make it. /healthz answers without
credentials, so basic auth changes nothing. With TLS an httpGet probe needs scheme HTTPS (the
kubelet does not verify the certificate); with a client certificate required the kubelet, which
has none, cannot pass the handshake, so the probe becomes a tcpSocket probe on the same port.
Call with (dict "probe" .Values.livenessProbe "root" .).
*/}}
{{- define "gil-exporter.probe" -}}
{{- $probe := deepCopy .probe }}
{{- $tls := include "gil-exporter.webTLS" .root }}
{{- if hasKey $probe "httpGet" }}
{{- if eq $tls "mtls" }}
{{- $_ := set $probe "tcpSocket" (dict "port" $probe.httpGet.port) }}
{{- $_ := unset $probe "httpGet" }}
{{- else if and (eq $tls "tls") (not $probe.httpGet.scheme) }}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
scheme, tlsConfig and basicAuth of a ServiceMonitor endpoint / PodMonitor podMetricsEndpoint,
checked against the web config so that a mismatch fails the install instead of every scrape.
Call with (dict "monitor" .Values.serviceMonitor "name" "serviceMonitor" "root" .).
*/}}
{{- define "gil-exporter.scrapeAuth" -}}
{{- $m := .monitor }}
{{- $mon := .name }}
{{- $tls := include "gil-exporter.webTLS" .root }}
{{- $scheme := $m.scheme | default (ternary "http" "https" (eq $tls "none")) }}
{{- if and (eq $scheme "http") (ne $tls "none") }}
{{- fail (printf "%s.scheme is http but the web config serves TLS: use https (or leave it empty)" $mon) }}
{{- end }}
{{- if and (eq $scheme "https") (eq $tls "none") }}
{{- fail (printf "%s.scheme is https but there is no TLS in the web config (webConfig)" $mon) }}
{{- end }}
{{- with .root.Values.webConfig.config }}
{{- if and .basic_auth_users (not $m.basicAuth) }}
{{- fail (printf "webConfig.config has basic_auth_users: set %s.basicAuth (a Secret with the username and password), or every scrape gets 401" $mon) }}
{{- end }}
{{- end }}
scheme: {{ $scheme }}
{{- with $m.tlsConfig }}
tlsConfig:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $m.basicAuth }}
basicAuth:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
"true" when the headless Service is rendered. service.enabled: true always, false never, unset
(null): only with the ServiceMonitor, which finds the exporters through it. The Service
publishes every node's exporter (landing page included) by DNS to the whole cluster, and
nothing else needs it.
*/}}
{{- define "gil-exporter.serviceEnabled" -}}
{{- $service := .Values.service.enabled }}
{{- if kindIs "invalid" $service }}{{ $service = .Values.serviceMonitor.enabled }}{{ end }}
{{- if and (eq .Values.mode "daemonset") $service }}true{{ end }}
{{- end }}
