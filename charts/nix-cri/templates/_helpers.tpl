{{/* Chart name, at most 63 characters. */}}
{{- define "nix-cri.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name added unless the release already has it. */}}
{{- define "nix-cri.fullname" -}}
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

{{- define "nix-cri.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels. */}}
{{- define "nix-cri.labels" -}}
helm.sh/chart: {{ include "nix-cri.chart" . }}
{{ include "nix-cri.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nix-cri
{{- end }}

{{/* Labels that select the DaemonSet's pods (immutable once installed). */}}
{{- define "nix-cri.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nix-cri.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nix-cri.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nix-cri.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nix-cri.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The port of metricsAddr ("0.0.0.0:9477", "[::]:9477"). */}}
{{- define "nix-cri.metricsPort" -}}
{{- regexReplaceAll "^.*:" .Values.metricsAddr "" }}
{{- end }}

{{/* The host of metricsAddr when it is a loopback address (the probes must use it), else "". */}}
{{- define "nix-cri.metricsLoopbackHost" -}}
{{- $host := regexReplaceAll ":[0-9]+$" .Values.metricsAddr "" | trimPrefix "[" | trimSuffix "]" }}
{{- if or (hasPrefix "127." $host) (eq $host "::1") }}{{ $host }}{{ end }}
{{- end }}

{{/* Where the installer containers read the config: the ConfigMap's mount. */}}
{{- define "nix-cri.configPath" -}}
/etc/nix-cri/config.toml
{{- end }}

{{/* A TOML float: 5 -> 5.0, 2.5 -> 2.5. */}}
{{- define "nix-cri.tomlFloat" -}}
{{- $v := float64 . }}
{{- if eq $v (floor $v) }}{{ printf "%.1f" $v }}{{ else }}{{ $v }}{{ end }}
{{- end }}

{{/* What both installer containers share: env, privileges, mounts, resources. */}}
{{- define "nix-cri.containerCommon" -}}
env:
  - name: NODE_NAME
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
securityContext:
  privileged: true
volumeMounts:
  - name: host-root
    mountPath: /host
  - name: config
    mountPath: {{ include "nix-cri.configPath" . | dir }}
    readOnly: true
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "nix-cri.probeTiming" -}}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end }}
