{{/* Names and labels shared by every template. */}}
{{- define "kars.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kars.router" -}}{{ include "kars.fullname" . | trunc 56 | trimSuffix "-" }}-router{{- end -}}
{{- /* Service names are DNS-1035 labels (at most 63): each base is cut so its suffix fits. */ -}}
{{- define "kars.routerReplicas" -}}{{ include "kars.fullname" . | trunc 47 | trimSuffix "-" }}-router-replicas{{- end -}}
{{- define "kars.controller" -}}{{ include "kars.fullname" . | trunc 52 | trimSuffix "-" }}-controller{{- end -}}
{{- define "kars.adminSecret" -}}
{{- .Values.admin.existingSecret | default (printf "%s-admin" (include "kars.fullname" .)) -}}
{{- end -}}
{{- define "kars.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kars.labels" -}}
app.kubernetes.io/part-of: kars
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /* Selectors: name + instance (kars.labels already carries the instance). */ -}}
{{- define "kars.routerSelector" -}}
app.kubernetes.io/name: kars-router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kars.controllerSelector" -}}
app.kubernetes.io/name: kars-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The chart's own Redis: when the router's store is redis and no URL or Secret names another. */ -}}
{{- define "kars.redis" -}}{{ include "kars.fullname" . | trunc 57 | trimSuffix "-" }}-redis{{- end -}}
{{- define "kars.deployRedis" -}}
{{- $b := .Values.router.budgets -}}
{{- if and .Values.redis.deploy (eq $b.store "redis") (not $b.redisUrl) (not $b.redisUrlSecret.name) -}}true{{- end -}}
{{- end -}}
{{- define "kars.redisSelector" -}}
app.kubernetes.io/name: kars-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
