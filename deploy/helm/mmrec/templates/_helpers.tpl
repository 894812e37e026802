{{/* Names and labels. */}}
{{- define "mmrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mmrec.fullname" -}}
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

{{- define "mmrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmrec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mmrec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mmrec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: triton
mmrec.io/target: {{ .Values.model.target }}
{{- end }}

{{- define "mmrec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mmrec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Storage scheme of modelRepository.uri: s3, gs or as; fails on anything else. */}}
{{- define "mmrec.storageScheme" -}}
{{- $uri := required "modelRepository.uri is required: s3://bucket/prefix, gs://bucket/prefix or as://account/container/prefix" .Values.modelRepository.uri }}
{{- if hasPrefix "s3://" $uri }}s3
{{- else if hasPrefix "gs://" $uri }}gs
{{- else if hasPrefix "as://" $uri }}as
{{- else }}{{ fail (printf "modelRepository.uri %q: expected an s3://, gs:// or as:// location (Triton pulls the repository from object storage)" $uri) }}
{{- end }}
{{- end }}

{{/* python backend shm region size: explicit, or two full batches of decoded images. */}}
{{- define "mmrec.shmDefaultByteSize" -}}
{{- if .Values.triton.python.shmDefaultByteSize }}
{{- .Values.triton.python.shmDefaultByteSize | int64 }}
{{- else }}
{{- $size := int64 .Values.model.imageSize }}
{{- mul 2 (int64 .Values.model.maxBatchSize) 3 $size $size 4 }}
{{- end }}
{{- end }}

{{/* Readiness path: the whole server, or one model. */}}
{{- define "mmrec.readinessPath" -}}
{{- if .Values.probes.readiness.model }}
{{- printf "/v2/models/%s/ready" .Values.probes.readiness.model }}
{{- else }}
{{- print "/v2/health/ready" }}
{{- end }}
{{- end }}

{{/* Checks that values describe a deployable combination; rendered for its side effects. */}}
{{- define "mmrec.validate" -}}
{{- $target := .Values.model.target }}
{{- if and (eq $target "tensorrt") (lt (int .Values.gpu.count) 1) }}
{{- fail "model.target=tensorrt needs gpu.count >= 1: TensorRT plans only run on the GPU they were built for" }}
{{- end }}
{{- if and (eq $target "portable") .Values.pythonDeps.install }}
{{- $hasOrt := false }}
{{- range .Values.pythonDeps.packages }}{{ if hasPrefix "onnxruntime" . }}{{ $hasOrt = true }}{{ end }}{{ end }}
{{- if not $hasOrt }}
{{- fail "model.target=portable runs ONNX Runtime inside python models: add onnxruntime (or onnxruntime-gpu) to pythonDeps.packages" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.triton.modelControlMode "explicit") (not .Values.triton.loadModels) }}
{{- fail "triton.modelControlMode=explicit needs triton.loadModels (use [\"*\"] for all models)" }}
{{- end }}
{{- if and (has "*" .Values.triton.loadModels) (gt (len .Values.triton.loadModels) 1) }}
{{- fail "triton.loadModels: \"*\" must be the only entry (tritonserver rejects it combined with names)" }}
{{- end }}
{{- $drain := add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.triton.exitTimeoutSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + triton.exitTimeoutSeconds (%d), or in-flight requests are killed" (int .Values.terminationGracePeriodSeconds) $drain) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* tritonserver argv after the binary. */}}
{{- define "mmrec.tritonArgs" -}}
- --model-repository={{ .Values.modelRepository.uri }}
- --model-control-mode={{ .Values.triton.modelControlMode }}
{{- if eq .Values.triton.modelControlMode "explicit" }}
{{- range .Values.triton.loadModels }}
- --load-model={{ . }}
{{- end }}
{{- end }}
{{- if eq .Values.triton.modelControlMode "poll" }}
- --repository-poll-secs={{ .Values.triton.repositoryPollSecs }}
{{- end }}
- --strict-readiness={{ .Values.triton.strictReadiness }}
- --disable-auto-complete-config
- --exit-timeout-secs={{ .Values.triton.exitTimeoutSeconds }}
- --model-load-retry-count={{ .Values.triton.modelLoadRetryCount }}
- --http-port={{ .Values.ports.http }}
- --grpc-port={{ .Values.ports.grpc }}
- --metrics-port={{ .Values.ports.metrics }}
- --allow-metrics=true
- --allow-cpu-metrics=true
- --allow-gpu-metrics={{ gt (int .Values.gpu.count) 0 }}
- --metrics-interval-ms={{ .Values.triton.metrics.intervalMs }}
{{- if .Values.triton.metrics.summaryLatencies }}
- --metrics-config=summary_latencies=true
{{- end }}
- --log-verbose={{ .Values.triton.logVerbose }}
- --log-format={{ .Values.triton.logFormat }}
- --backend-config=python,shm-default-byte-size={{ include "mmrec.shmDefaultByteSize" . }}
- --backend-config=python,shm-growth-byte-size={{ .Values.triton.python.shmGrowthByteSize | int64 }}
{{- if .Values.triton.grpc.maxConnectionAgeMs }}
- --grpc-max-connection-age={{ .Values.triton.grpc.maxConnectionAgeMs | int64 }}
- --grpc-max-connection-age-grace={{ .Values.triton.grpc.maxConnectionAgeGraceMs | int64 }}
{{- end }}
{{- range .Values.triton.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
