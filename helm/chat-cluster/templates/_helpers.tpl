{{/* Chart name, shortened to what label values allow. */}}
{{- define "chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Kept at most 40 characters so that the
room-node pod names (prefix + "-room-node-" + ordinal) stay valid node ids
([A-Za-z0-9_-]{1,64}) and DNS labels.
*/}}
{{- define "chat.fullname" -}}
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

{{/* Labels of every resource. */}}
{{- define "chat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chat-cluster
{{- end }}

{{/* Selector labels of one component: pass (list $ "gateway"). */}}
{{- define "chat.selectorLabels" -}}
{{- $ := index . 0 }}
app.kubernetes.io/name: {{ include "chat.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Image reference of one component: pass (list $ .Values.gateway.image). */}}
{{- define "chat.image" -}}
{{- $ := index . 0 }}
{{- $repo := (index . 1).repository }}
{{- $tag := default $.Chart.AppVersion $.Values.image.tag }}
{{- if $.Values.image.registry }}
{{- printf "%s/%s:%s" (trimSuffix "/" $.Values.image.registry) $repo $tag }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding database URL, JWT secret and API key. */}}
{{- define "chat.secretName" -}}
{{- default (include "chat.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Volumes for NATS credentials and CA, shared by both components. */}}
{{- define "chat.natsVolumes" -}}
{{- if .Values.nats.credsSecret }}
- name: nats-creds
  secret:
    secretName: {{ .Values.nats.credsSecret }}
    items:
      - key: {{ .Values.nats.credsSecretKey }}
        path: nats.creds
{{- end }}
{{- if .Values.nats.caSecret }}
- name: nats-ca
  secret:
    secretName: {{ .Values.nats.caSecret }}
    items:
      - key: {{ .Values.nats.caSecretKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "chat.natsMounts" -}}
{{- if .Values.nats.credsSecret }}
- name: nats-creds
  mountPath: /etc/chat/nats-creds
  readOnly: true
{{- end }}
{{- if .Values.nats.caSecret }}
- name: nats-ca
  mountPath: /etc/chat/nats-ca
  readOnly: true
{{- end }}
{{- end }}

{{/*
Checksum of everything the pods read from ConfigMaps and the chart's Secret,
so a changed setting rolls the pods.
*/}}
{{- define "chat.configChecksum" -}}
{{- $cfg := include (print $.Template.BasePath "/configmap.yaml") . }}
{{- $sec := include (print $.Template.BasePath "/secret.yaml") . }}
{{- printf "%s%s" $cfg $sec | sha256sum }}
{{- end }}
