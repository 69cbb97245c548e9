{{/* Names: <release>-csm-triton, truncated to what DNS labels allow. */}}
{{- define "csm-triton.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "csm-triton.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "csm-triton.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "csm-triton.image" -}}
{{- if eq (toString .Values.image.tag) "latest" -}}
{{- fail "image.tag: use an immutable tag, not latest" -}}
{{- end -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "csm-triton.repositoryClaim" -}}
{{- .Values.repository.existingClaim | default (printf "%s-repository" (include "csm-triton.fullname" .)) -}}
{{- end -}}

{{- define "csm-triton.voicesClaim" -}}
{{- .Values.voices.existingClaim | default (printf "%s-voices" (include "csm-triton.fullname" .)) -}}
{{- end -}}

{{- define "csm-triton.modelRepository" -}}
{{ .Values.repository.mountPath }}/model_repository
{{- end -}}

{{/*
The arguments of docker/serve.sh = those of `csm-triton-server args`: serve.sh builds
tritonserver's flags from them with server_arguments, as compose's triton service and the
embedded server do (tests/test_kubernetes.py checks the flags are the same).
*/}}
{{- define "csm-triton.serverArgs" -}}
- /opt/csm-triton/docker/serve.sh
- --model-repository
- {{ include "csm-triton.modelRepository" . }}
- --http-port
- {{ .Values.triton.ports.http | quote }}
- --grpc-port
- {{ .Values.triton.ports.grpc | quote }}
- --metrics-port
- {{ .Values.triton.ports.metrics | quote }}
- --model-control
- {{ .Values.triton.modelControl }}
- {{ ternary "--gpu" "--no-gpu" .Values.triton.gpu }}
- --exit-timeout
- {{ .Values.triton.exitTimeoutSeconds | quote }}
{{- with .Values.triton.extraServerFlags }}
- "--"
{{- range . }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Drop every capability, no privilege escalation, read-only root filesystem. */}}
{{- define "csm-triton.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/*
The Triton container's command: the Secret files' first lines become the environment
serve.sh and the server read ($CSM_ADMIN_TOKEN, $CSM_MODEL_CONTROL_KEY), then the args run.
*/}}
{{- define "csm-triton.secretsToEnvironment" -}}
- /bin/sh
- -c
- >-
  if [ -s "${CSM_ADMIN_TOKEN_FILE:-}" ]; then
  CSM_ADMIN_TOKEN="$(head -n 1 "$CSM_ADMIN_TOKEN_FILE")"; export CSM_ADMIN_TOKEN;
  fi;
  if [ -s "${CSM_MODEL_CONTROL_KEY_FILE:-}" ]; then
  CSM_MODEL_CONTROL_KEY="$(head -n 1 "$CSM_MODEL_CONTROL_KEY_FILE")"; export CSM_MODEL_CONTROL_KEY;
  fi; exec "$@"
- csm-serve
{{- end -}}

{{/* Pod labels of a component (triton, gateway, front, export). */}}
{{- define "csm-triton.componentSelector" -}}
{{ include "csm-triton.selector" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}
