{{/*
Names, labels and shared values of the wxscale chart.
*/}}

{{- define "wxscale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects, cut to 63 characters (the limit of a DNS-1123 label).
*/}}
{{- define "wxscale.fullname" -}}
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

{{- define "wxscale.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels shared by every object of the release; each object adds its component.
*/}}
{{- define "wxscale.commonLabels" -}}
helm.sh/chart: {{ include "wxscale.chart" . }}
app.kubernetes.io/name: {{ include "wxscale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: wxscale
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "wxscale.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wxscale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "wxscale.labels" -}}
{{ include "wxscale.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "wxscale.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wxscale.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wxscale.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Ports of the liveness endpoint (kopf, GET /healthz) and the Prometheus exporter,
passed to the operator as --liveness-port and --metrics-port.
*/}}
{{- define "wxscale.healthPort" -}}8080{{- end }}
{{- define "wxscale.metricsPort" -}}9090{{- end }}

{{/*
Namespaces that get a trainer ServiceAccount: the watched ones, or the release
namespace when the operator watches all namespaces.
*/}}
{{- define "wxscale.trainerNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
RBAC rules: the requests the operator and kopf make, plus `get` next to `list`
or `patch`, which exposes nothing more. A ClusterRole carries them when the
operator watches all namespaces, and one Role per watched namespace otherwise. kopf's namespace and CRD scanning is off in the
operator, so it needs no access to namespaces or CRDs (API discovery is open
to every authenticated client).
*/}}
{{- define "wxscale.rules" -}}
# kopf watches studies and patches its progress annotations on them; the operator reads one study at a time.
- apiGroups: ["wxscale.io"]
  resources: ["scalingstudies"]
  verbs: ["get", "list", "watch", "patch"]
# Status is a subresource, written with merge patches.
- apiGroups: ["wxscale.io"]
  resources: ["scalingstudies/status"]
  verbs: ["get", "patch"]
# One PyTorchJob per trial: created, followed, suspended (patch) and stopped (delete).
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# Events on the study for each trial created, succeeded or failed (core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
