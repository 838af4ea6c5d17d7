{{/* Names and labels: deterministic, so Argo CD sees no drift between renders. */}}
{{- define "sagaflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sagaflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sagaflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sagaflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sagaflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sagaflow.labels" -}}
helm.sh/chart: {{ include "sagaflow.chart" . }}
{{ include "sagaflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sagaflow
{{- end -}}

{{- define "sagaflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sagaflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Runners get their own account (no RBAC) when the chart creates accounts. */}}
{{- define "sagaflow.runnerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-runner" (include "sagaflow.serviceAccountName" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "sagaflow.serviceAccountName" . -}}
{{- end -}}
{{- end -}}

{{- define "sagaflow.image" -}}
{{- $img := .image -}}
{{- $root := .root -}}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag | toString) -}}
{{- end -}}

{{- define "sagaflow.serviceAccountAnnotations" -}}
{{- $ann := deepCopy (default dict .Values.serviceAccount.annotations) -}}
{{- if and .Values.workloadIdentity.enabled .Values.workloadIdentity.clientId -}}
{{- $_ := set $ann "azure.workload.identity/client-id" .Values.workloadIdentity.clientId -}}
{{- end -}}
{{- if $ann }}
annotations:
  {{- toYaml $ann | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "sagaflow.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name | quote }}
      key: {{ .ref.key | quote }}
{{- end -}}

{{/* The SAGAFLOW_* settings shared by the operator and every runner. */}}
{{- define "sagaflow.env" -}}
{{- $v := .Values -}}
{{ include "sagaflow.secretEnv" (dict "env" "SAGAFLOW_DATABASE_URL" "ref" $v.database.urlSecret) }}
- name: SAGAFLOW_BUS
  value: {{ $v.bus.type | quote }}
{{- if eq $v.bus.type "servicebus" }}
{{- with $v.bus.servicebus.connectionStringSecret }}
{{ include "sagaflow.secretEnv" (dict "env" "SAGAFLOW_SERVICEBUS_CONNECTION_STRING" "ref" .) }}
{{- end }}
{{- with $v.bus.servicebus.namespace }}
- name: SAGAFLOW_SERVICEBUS_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- end }}
- name: SAGAFLOW_PAYLOADS
  value: {{ $v.payloads.type | quote }}
- name: SAGAFLOW_PAYLOAD_THRESHOLD_BYTES
  value: {{ $v.payloads.thresholdBytes | int | quote }}
{{- if eq $v.payloads.type "local" }}
- name: SAGAFLOW_PAYLOAD_DIR
  value: {{ $v.payloads.local.dir | quote }}
{{- else }}
{{- with $v.payloads.azureblob.connectionStringSecret }}
{{ include "sagaflow.secretEnv" (dict "env" "SAGAFLOW_BLOB_CONNECTION_STRING" "ref" .) }}
{{- end }}
{{- with $v.payloads.azureblob.accountUrl }}
- name: SAGAFLOW_BLOB_ACCOUNT_URL
  value: {{ . | quote }}
{{- end }}
- name: SAGAFLOW_BLOB_CONTAINER
  value: {{ $v.payloads.azureblob.container | quote }}
- name: SAGAFLOW_BLOB_CREATE_CONTAINER
  value: {{ $v.payloads.azureblob.createContainer | toString | quote }}
{{- end }}
- name: SAGAFLOW_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sagaflow.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if eq .Values.payloads.type "local" }}
- name: payloads
{{- if .Values.payloads.local.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.payloads.local.existingClaim | quote }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end -}}

{{- define "sagaflow.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if eq .Values.payloads.type "local" }}
- name: payloads
  mountPath: {{ .Values.payloads.local.dir | quote }}
{{- end }}
{{- end -}}

{{/* The operator's permissions: listed exactly, no wildcards. */}}
{{- define "sagaflow.rules" -}}
- apiGroups: ["sagaflow.io"]
  resources: ["workflows", "executions", "schedules", "triggers"]
  verbs: ["get", "list", "watch", "patch"]
# Executions are created for child workflows and by Schedules, Triggers and the API;
# finished ones are deleted after their ttlSecondsAfterFinished.
- apiGroups: ["sagaflow.io"]
  resources: ["executions"]
  verbs: ["create", "delete"]
- apiGroups: ["sagaflow.io"]
  resources: ["workflows/status", "executions/status", "schedules/status", "triggers/status"]
  verbs: ["patch"]
- apiGroups: ["sagaflow.io"]
  resources: ["workflows/finalizers", "executions/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# A webhook Trigger's HMAC or bearer secret, read by name (secretRef); never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}

{{/* Cluster-scoped, so never in a Role: the API checks callers' tokens and asks the
API server whether they may do what they ask. */}}
{{- define "sagaflow.authRules" -}}
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
- apiGroups: ["authorization.k8s.io"]
  resources: ["subjectaccessreviews"]
  verbs: ["create"]
{{- end -}}
