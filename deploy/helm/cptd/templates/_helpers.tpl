{{/* Object names: "<fullname>-<component>"; fullname = fullnameOverride or the release name. */}}
{{- define "cptd.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; "cptd.selector" (name + instance) is the part selectors use. */}}
{{- define "cptd.selector" -}}
app.kubernetes.io/name: {{ include "cptd.fullname" .root }}-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "cptd.labels" -}}
{{ include "cptd.selector" . }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: cptd
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The policy text, and the parsed policy (for its name, topics and group). */}}
{{- define "cptd.policyText" -}}
{{- if .Values.policy }}{{ .Values.policy }}{{ else }}{{ .Files.Get "files/policy.yaml" }}{{ end -}}
{{- end -}}

{{- define "cptd.image" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{/* The restricted Pod Security Standard, for a pod running as uid/gid .uid. */}}
{{- define "cptd.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cptd.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The AWS variables boto3 (the daemon) and the Run:ai streamer (vLLM) both read, for storage.objectStorage. */}}
{{- define "cptd.objectStorageEnv" -}}
{{- $o := .Values.storage.objectStorage -}}
{{- with $o.endpoint }}
- {name: AWS_ENDPOINT_URL, value: {{ . | quote }}}
- {name: RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING, value: "0"}
{{- end }}
{{- with $o.region }}
- {name: AWS_REGION, value: {{ . | quote }}}
{{- end }}
{{- if $o.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ $o.credentialsSecret }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $o.credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- end -}}

{{- define "cptd.checkpointsClaim" -}}
{{- default (printf "%s-checkpoints" (include "cptd.fullname" .)) .Values.storage.checkpoints.existingClaim -}}
{{- end -}}

{{/* Refusals before anything renders: combinations the daemon cannot run, named (values.schema.json refuses
   misspelled keys, wrong types and unknown enum values). */}}
{{- define "cptd.validate" -}}
{{- if .Values.storage.objectStorage.enabled -}}
{{- if not .Values.storage.objectStorage.url -}}
{{- fail "storage.objectStorage.url is empty: set s3://bucket/prefix (the base checkpoint at PREFIX/base)" -}}
{{- end -}}
{{- if eq .Values.launcher.mode "kubernetes" -}}
{{- fail "storage.objectStorage with launcher.mode kubernetes is not supported: the daemon stages checkpoints in its own scratch, which a training pod does not see; use launcher.mode inPod" -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.kafka.bootstrap) (not .Values.kafka.bundled.enabled) -}}
{{- fail "kafka.bootstrap is empty: set your Kafka's bootstrap (host:port) or kafka.bundled.enabled=true" -}}
{{- end -}}
{{- if and .Values.kafka.bootstrap .Values.kafka.bundled.enabled -}}
{{- fail "kafka.bootstrap and kafka.bundled.enabled are both set: pick one" -}}
{{- end -}}
{{- if and (hasPrefix "SASL_" .Values.kafka.securityProtocol) (not .Values.kafka.sasl.mechanism) -}}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.mechanism" .Values.kafka.securityProtocol) -}}
{{- end -}}
{{- if and (not .Values.redis.url) (not .Values.redis.bundled.enabled) -}}
{{- fail "redis.url is empty: set your Redis URL (rediss://host:6379/0) or redis.bundled.enabled=true" -}}
{{- end -}}
{{- if and .Values.redis.url .Values.redis.bundled.enabled -}}
{{- fail "redis.url and redis.bundled.enabled are both set: pick one" -}}
{{- end -}}
{{- if and (not .Values.vllm.controlUrl) (not .Values.vllm.urls) (not .Values.vllm.bundled.enabled) -}}
{{- fail "vllm.controlUrl and vllm.urls are empty: set one (your engines' headless Service) or vllm.bundled.enabled=true" -}}
{{- end -}}
{{- if and (or .Values.vllm.controlUrl .Values.vllm.urls) .Values.vllm.bundled.enabled -}}
{{- fail "vllm.controlUrl/urls and vllm.bundled.enabled are both set: pick one" -}}
{{- end -}}
{{- if and .Values.vllm.headlessService.create (not .Values.vllm.headlessService.selector) -}}
{{- fail "vllm.headlessService.create needs vllm.headlessService.selector (your vLLM pods' labels)" -}}
{{- end -}}
{{- if and .Values.kafka.strimzi.enabled (not .Values.kafka.strimzi.cluster) -}}
{{- fail "kafka.strimzi.enabled needs kafka.strimzi.cluster (the name of your Kafka resource)" -}}
{{- end -}}
{{- end -}}
