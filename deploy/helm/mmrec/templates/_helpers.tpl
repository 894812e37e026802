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

{{/* The `helm test` pod's labels: never the selector labels (the Service would route clients
     to it); the NetworkPolicy admits callers with these. */}}
{{- define "mmrec.helmTestLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
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

{{/* The NGC Triton image the chart is checked against and deploy/docker/Dockerfile builds on
     (Chart.yaml annotation mmrec.io/triton-image), as [repository, tag]. */}}
{{- define "mmrec.ngcImage" -}}
{{- $ref := index .Chart.Annotations "mmrec.io/triton-image" }}
{{- $repository := regexReplaceAll ":[^:/]+$" $ref "" }}
{{- list $repository (trimPrefix (printf "%s:" $repository) $ref) | toJson }}
{{- end }}

{{/* The image reference: repository:tag, pinned to a digest when image.digest is set. The bare
     NGC image lacks the python models' packages: it is accepted only with the pip init container
     (pythonDeps.install). Bare = NGC's repository, a mirror of it (…/nvidia/tritonserver) under a
     tag without -mmrec, or any repository under NGC's own tag (a re-tagged copy): our builds are
     tagged <NGC tag>-mmrec[-portable]. image.tag "" = the NGC tag for the NGC image, else the tag
     the docs build deploy/docker/Dockerfile under for this target. */}}
{{- define "mmrec.image" -}}
{{- $ngc := include "mmrec.ngcImage" . | fromJsonArray }}
{{- $repository := .Values.image.repository }}
{{- $mirror := and (hasSuffix "/nvidia/tritonserver" $repository) (not (contains "-mmrec" (toString .Values.image.tag))) }}
{{- $bare := or (eq $repository (index $ngc 0)) $mirror (eq (toString .Values.image.tag) (index $ngc 1)) }}
{{- if and $bare (not .Values.pythonDeps.install) }}
{{- fail (printf "image.repository=%s is the bare NGC Triton image: it lacks the packages the python models import (tokenizers, pillow, onnxruntime ...). Build deploy/docker/Dockerfile (NGC Triton + the chart's hash-pinned files/requirements/), push it and set image.repository to it (docs/deployment.md, \"Install\"); or, for development with a route to PyPI, opt in to the pip init container with pythonDeps.install=true" (index $ngc 0)) }}
{{- end }}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary (index $ngc 1) (printf "%s-mmrec%s" (index $ngc 1) (ternary "-portable" "" (eq .Values.model.target "portable"))) $bare }}
{{- end }}
{{- $image := printf "%s:%s" .Values.image.repository $tag }}
{{- with .Values.image.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .) }}
{{- fail (printf "image.digest %q: expected sha256:<64 hex digits>" .) }}
{{- end }}
{{- $image = printf "%s@%s" $image . }}
{{- end }}
{{- $image }}
{{- end }}

{{/* Bytes in a Kubernetes quantity ("512Mi", "2Gi", "1G", "1000"); fails on anything else. */}}
{{- define "mmrec.bytes" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $mult := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- if or (not $num) (not (hasKey $mult $unit)) }}
{{- fail (printf "unsupported size %q: use an integer with Ki, Mi, Gi, Ti, k, M, G or T" $q) }}
{{- end }}
{{- mul (int64 $num) (get $mult $unit) }}
{{- end }}

{{/* Millicores in a CPU quantity ("4", 4, "500m", "2.5"; "" = 0), rounded up to whole
     millicores as Kubernetes does; fails on anything else. */}}
{{- define "mmrec.millicores" -}}
{{- $q := toString . }}
{{- if eq $q "" }}0
{{- else if regexMatch "^[0-9]+m$" $q }}{{ trimSuffix "m" $q | int64 }}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?$" $q }}
{{- $parts := splitList "." $q }}
{{- $frac := printf "%s000" (ternary (last $parts) "" (eq (len $parts) 2)) }}
{{- $extra := ternary 1 0 (regexMatch "[1-9]" (substr 3 (len $frac) $frac)) }}
{{- /* leading zeros stripped: int64 would read "050" as octal */}}
{{- $milli := substr 0 3 $frac | trimPrefix "0" | trimPrefix "0" | default "0" | int64 }}
{{- add (mul (int64 (first $parts)) 1000) $milli $extra }}
{{- else }}{{ fail (printf "unsupported CPU quantity %q: use cores (\"4\", \"2.5\") or millicores (\"500m\")" $q) }}
{{- end }}
{{- end }}

{{/* The Triton container's CPU request in millicores: resources.requests.cpu, else
     resources.limits.cpu (Kubernetes copies a limit into an unset request); 0 = neither set. */}}
{{- define "mmrec.cpuRequestMillis" -}}
{{- $resources := .Values.resources | default dict }}
{{- $requests := get $resources "requests" | default dict }}
{{- $limits := get $resources "limits" | default dict }}
{{- include "mmrec.millicores" (ternary (get $requests "cpu") (get $limits "cpu") (hasKey $requests "cpu")) }}
{{- end }}

{{/* "true" when the cluster serves the Prometheus Operator's CRDs (monitoring.coreos.com/v1),
     else "". Gates every Prometheus Operator object (ServiceMonitor, PrometheusRule, ...), so
     `helm install` works on a cluster without them; `helm template` needs
     --api-versions monitoring.coreos.com/v1/ServiceMonitor to render them. */}}
{{- define "mmrec.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" }}true{{ end }}
{{- end }}

{{/* "true" when the cluster serves monitoring.coreos.com/v1 PrometheusRule, else "": checked on
     its own, as a cluster can serve ServiceMonitor without it (a partial CRD install). */}}
{{- define "mmrec.hasPrometheusRule" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule" }}true{{ end }}
{{- end }}

{{/* The Triton container's start script (`sh -c`, after NVIDIA's entrypoint). It clears what a
     previous run of this container left in the emptyDirs (the drain marker; the repository copy,
     as Triton wants an empty TRITON_*_MOUNT_DIRECTORY) and execs tritonserver with the chart's
     args ("$@"), so tritonserver is the process that receives SIGTERM. With restricted APIs it
     adds their flags with the admin key: the one of triton.restrictedApis.existingSecret
     ($MMREC_ADMIN_KEY; empty there stops the container with an error instead of silently locking
     the APIs with a key nobody holds), else 32 random bytes drawn here for this container alone,
     so no rendering holds a key (GitOps renders stay identical) and nobody can use the locked APIs. */}}
{{- define "mmrec.startScript" -}}
{{- $exec := printf "rm -f %s && find %s -mindepth 1 -delete && " (include "mmrec.drainMarker" .) (include "mmrec.repositoryCache" .) }}
{{- with .Values.triton.restrictedApis.apis }}
{{- $apis := printf "%s:%s" (join "," .) $.Values.triton.restrictedApis.header }}
{{- if $.Values.triton.restrictedApis.existingSecret }}
{{- $exec }}key="${MMREC_ADMIN_KEY:?is empty: key admin-key of Secret {{ $.Values.triton.restrictedApis.existingSecret }} (triton.restrictedApis.existingSecret) must hold the admin key}" && exec /opt/tritonserver/bin/tritonserver "$@" "--grpc-restricted-protocol={{ $apis }}=$key" "--http-restricted-api={{ $apis }}=$key"
{{- else }}
{{- $exec }}key="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" && { [ -n "$key" ] || { echo "mmrec: could not draw a random admin key from /dev/urandom" >&2; exit 1; }; } && exec /opt/tritonserver/bin/tritonserver "$@" "--grpc-restricted-protocol={{ $apis }}=$key" "--http-restricted-api={{ $apis }}=$key"
{{- end }}
{{- else }}
{{- $exec }}exec /opt/tritonserver/bin/tritonserver "$@"
{{- end }}
{{- end }}

{{/* Shortest preStop (s) that outlasts every gRPC connection a client can hold: one opened just
     before the endpoint removal reached kube-proxy is closed by Triton at most
     1.1 x max-connection-age (gRPC adds +-10 % jitter) + grace later. */}}
{{- define "mmrec.minPreStopSeconds" -}}
{{- $ageMs := int64 .Values.triton.grpc.maxConnectionAgeMs }}
{{- $graceMs := int64 .Values.triton.grpc.maxConnectionAgeGraceMs }}
{{- $propagationMs := mul (int64 .Values.lifecycle.endpointPropagationSeconds) 1000 }}
{{- $ms := add (div (mul $ageMs 11) 10) $graceMs $propagationMs }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{- define "mmrec.preStopSeconds" -}}
{{- $min := include "mmrec.minPreStopSeconds" . | int64 }}
{{- if kindIs "invalid" .Values.lifecycle.preStopSleepSeconds }}
{{- $min }}
{{- else }}
{{- $set := int64 .Values.lifecycle.preStopSleepSeconds }}
{{- if lt $set $min }}
{{- fail (printf "lifecycle.preStopSleepSeconds=%d is shorter than the %d s a client's gRPC connection can stay open (1.1 x triton.grpc.maxConnectionAgeMs + maxConnectionAgeGraceMs + lifecycle.endpointPropagationSeconds): calls on it would reach a stopping server. Leave it null or raise it" $set $min) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{- define "mmrec.terminationGracePeriodSeconds" -}}
{{- $drain := add (include "mmrec.preStopSeconds" . | int64) (int64 .Values.triton.exitTimeoutSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 10 }}
{{- else }}
{{- $set := int64 .Values.terminationGracePeriodSeconds }}
{{- if le $set $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed the preStop drain + triton.exitTimeoutSeconds (%d), or in-flight requests are killed" $set $drain) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/* Longest a rollout step may take (s): an old pod's termination (grace period) plus a new one's
     start (startup probe budget) plus 5 min for scheduling and the image pull. A rollout changes
     kube_deployment_status_replicas_updated at least this often, so MMRecReplicasUnavailable
     calls a Deployment stuck only after this long without a change. */}}
{{- define "mmrec.rolloutStepSeconds" -}}
{{- $startup := mul (int64 .Values.probes.startup.periodSeconds) (int64 .Values.probes.startup.failureThreshold) }}
{{- add (include "mmrec.terminationGracePeriodSeconds" . | int64) $startup 300 }}
{{- end }}

{{/* Marker the preStop hook creates; the readiness probe fails while it exists. In the /tmp
     emptyDir, which outlives a container restart, so the start command removes it. */}}
{{- define "mmrec.drainMarker" -}}/tmp/mmrec-draining{{- end }}

{{/* The emptyDir Triton copies the remote repository into (TRITON_*_MOUNT_DIRECTORY). */}}
{{- define "mmrec.repositoryCache" -}}/var/cache/mmrec/repository{{- end }}

{{/* Readiness: not while draining, else Triton's own readiness over HTTP. python3 -I -S:
     stdlib only, no PYTHONPATH packages, no proxy. A non-2xx answer raises (exit 1). */}}
{{- define "mmrec.readinessCommand" -}}
- python3
- -I
- -S
- -c
- |-
  import os, sys, urllib.request as u
  if os.path.exists(sys.argv[1]):
      sys.exit("draining: " + sys.argv[1])
  u.build_opener(u.ProxyHandler({})).open(sys.argv[2], timeout=float(sys.argv[3])).close()
- {{ include "mmrec.drainMarker" . }}
- {{ printf "http://127.0.0.1:%d%s" (int .Values.ports.http) (include "mmrec.readinessPath" .) }}
- {{ .Values.probes.readiness.timeoutSeconds | quote }}
{{- end }}

{{/* The python packages' requirement lines: the chart's hash-pinned files plus extraRequirements. */}}
{{- define "mmrec.requirements" -}}
{{- .Files.Get "files/requirements/base.txt" }}
{{- /* every target: catalog_scorer (a python model wherever an index is published) runs ONNX Runtime */}}
{{ .Files.Get "files/requirements/onnxruntime.txt" }}
{{- if eq .Values.model.target "portable" }}
{{ .Files.Get "files/requirements/openvino.txt" }}
{{- end }}
{{- with .Values.pythonDeps.extraRequirements }}
# pythonDeps.extraRequirements
{{- range . }}
{{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Sum of the disk-backed emptyDirs' size limits of the Triton container's pod, in MiB. */}}
{{- define "mmrec.ephemeralStorageMi" -}}
{{- $bytes := add (include "mmrec.bytes" .Values.tmpSizeLimit | int64) (include "mmrec.bytes" .Values.modelRepository.cacheSizeLimit | int64) }}
{{- if .Values.pythonDeps.install }}
{{- $bytes = add $bytes (include "mmrec.bytes" .Values.pythonDeps.sizeLimit | int64) }}
{{- end }}
{{- div (add $bytes 1048575) 1048576 }}
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
{{- if and (eq $target "tensorrt") (not .Values.gpu.products) }}
{{- fail "model.target=tensorrt needs gpu.products (e.g. [NVIDIA-A10G]): a TensorRT plan only runs on the GPU model it was built on, so the pods must be pinned to it" }}
{{- end }}
{{- range .Values.pythonDeps.extraRequirements }}
{{- if not (regexMatch "^[A-Za-z0-9_.\\[\\]-]+==[^ ]+( +--hash=sha256:[0-9a-f]{64})+$" .) }}
{{- fail (printf "pythonDeps.extraRequirements %q: expected \"name==version --hash=sha256:<hex>\" (pip runs with --require-hashes)" .) }}
{{- end }}
{{- end }}
{{- if and (hasPrefix "as://" .Values.modelRepository.uri) (not .Values.modelRepository.existingSecret) }}
{{- fail "modelRepository.uri as://... needs modelRepository.existingSecret with AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY: Triton 2.51 reads Azure blobs only with an account key (no workload/pod identity)" }}
{{- end }}
{{- if not (gt (int64 .Values.triton.grpc.maxConnectionAgeMs) 0) }}
{{- fail "triton.grpc.maxConnectionAgeMs must be > 0: without it clients keep their gRPC connections to a terminating pod until Triton stops, and their calls fail (see docs/deployment.md, Shutdown)" }}
{{- end }}
{{- if and .Values.triton.grpc.tls.enabled (not .Values.triton.grpc.tls.existingSecret) }}
{{- fail "triton.grpc.tls.enabled needs triton.grpc.tls.existingSecret (a kubernetes.io/tls Secret; ca.crt too for mutual TLS)" }}
{{- end }}
{{- if and (eq .Values.triton.modelControlMode "explicit") (not .Values.triton.loadModels) }}
{{- fail "triton.modelControlMode=explicit needs triton.loadModels (use [\"*\"] for all models)" }}
{{- end }}
{{- if and (has "*" .Values.triton.loadModels) (gt (len .Values.triton.loadModels) 1) }}
{{- fail "triton.loadModels: \"*\" must be the only entry (tritonserver rejects it combined with names)" }}
{{- end }}
{{- if and .Values.pythonDeps.extraRequirements (not .Values.pythonDeps.install) }}
{{- fail "pythonDeps.extraRequirements are installed by the pip init container only (pythonDeps.install=true): with the image of deploy/docker/Dockerfile, put them into a requirement file of its build context and name it in --build-arg REQUIREMENTS" }}
{{- end }}
{{- $restricted := .Values.triton.restrictedApis }}
{{- if and (eq .Values.triton.modelControlMode "explicit") (not (has "model-repository" ($restricted.apis | default list))) }}
{{- fail "triton.modelControlMode=explicit with model-repository missing from triton.restrictedApis.apis: anyone who reaches the pods could load and unload models (or point them at other files). Keep model-repository in triton.restrictedApis.apis and set triton.restrictedApis.existingSecret" }}
{{- end }}
{{- if and (eq .Values.triton.modelControlMode "explicit") (has "model-repository" ($restricted.apis | default list)) (not $restricted.existingSecret) }}
{{- fail (printf "triton.modelControlMode=explicit needs triton.restrictedApis.existingSecret: loading and unloading models (live swaps, `mmrec index publish --url`, which sends $MMREC_ADMIN_KEY) takes the admin key, and without a Secret each pod draws a random key nobody holds. Create one, e.g. `kubectl -n %s create secret generic %s-admin --from-literal=admin-key=$(openssl rand -hex 32)` (or through External Secrets / Sealed Secrets), and set triton.restrictedApis.existingSecret=%s-admin" .Release.Namespace (include "mmrec.fullname" .) (include "mmrec.fullname" .)) }}
{{- end }}
{{- if and (not (int .Values.triton.onnxruntime.intraOpThreads)) (eq (include "mmrec.cpuRequestMillis" . | int64) 0) }}
{{- fail "resources.requests.cpu (or resources.limits.cpu) is not set or 0: ONNX Runtime's thread pools are sized from the container's CPU request (downward API requests.cpu), which would read 0 and make ORT start one thread per core of the node. Set resources.requests.cpu, or triton.onnxruntime.intraOpThreads to a fixed count" }}
{{- end }}
{{- with .Values.rollingUpdate }}
{{- if and (eq (toString .maxSurge) "0") (eq (toString .maxUnavailable) "0") }}
{{- fail "rollingUpdate.maxSurge and rollingUpdate.maxUnavailable cannot both be 0: a rollout could then never replace a pod" }}
{{- end }}
{{- end }}
{{- $_ := include "mmrec.terminationGracePeriodSeconds" . }}
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
- --grpc-max-connection-age={{ .Values.triton.grpc.maxConnectionAgeMs | int64 }}
- --grpc-max-connection-age-grace={{ .Values.triton.grpc.maxConnectionAgeGraceMs | int64 }}
{{- if .Values.triton.grpc.tls.enabled }}
- --grpc-use-ssl=true
- --grpc-server-cert=/var/run/secrets/mmrec-tls/tls.crt
- --grpc-server-key=/var/run/secrets/mmrec-tls/tls.key
{{- if .Values.triton.grpc.tls.mutual }}
- --grpc-use-ssl-mutual=true
- --grpc-root-cert=/var/run/secrets/mmrec-tls/ca.crt
{{- end }}
{{- end }}
{{- /* the restricted-API flags carry the admin key: the start script adds them (mmrec.startScript) */}}
{{- if and (eq .Values.model.target "onnxruntime") .Values.triton.onnxruntime.globalThreadPool }}
{{- /* one ORT pool for all sessions, sized to the pod: $(MMREC_CPU_THREADS) = CPU request (downward API).
     Triton 2.51's backend gives the global pool no spin control (ORT's default: spinning on). */}}
- --backend-config=onnxruntime,enable-global-threadpool=1
- --backend-config=onnxruntime,intra_op_thread_count={{ if .Values.triton.onnxruntime.intraOpThreads }}{{ .Values.triton.onnxruntime.intraOpThreads | int }}{{ else }}$(MMREC_CPU_THREADS){{ end }}
- --backend-config=onnxruntime,inter_op_thread_count={{ .Values.triton.onnxruntime.interOpThreads | int }}
{{- end }}
{{- range .Values.triton.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
