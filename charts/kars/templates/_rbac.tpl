{{/* The controller's rules on namespaced resources (a ClusterRole, or one Role per watched namespace). */}}
{{- define "kars.controllerNamespacedRules" -}}
- apiGroups: ["kars.azure.com"]
  resources: ["karssandboxes"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["kars.azure.com"]
  resources: ["inferencepolicies", "toolpolicies", "mcpservers", "a2aagents"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kars.azure.com"]
  resources: ["karssandboxes/status", "inferencepolicies/status", "toolpolicies/status", "mcpservers/status", "a2aagents/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["get", "create", "patch"]  # deleted by the garbage collector (owner references), never by us
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
