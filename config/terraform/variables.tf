variable "project_id" {
  description = "GCP project that holds the cluster and the cache bucket."
  type        = string
}

variable "region" {
  description = "Region of the cluster (regional cluster) and of the cache bucket."
  type        = string
  default     = "europe-west4"
}

variable "zone" {
  description = "Set to a zone (e.g. europe-west4-a) for a cheaper zonal cluster; null makes a regional one."
  type        = string
  default     = null
}

variable "cluster_name" {
  description = "Name of the GKE cluster."
  type        = string
  default     = "spotrun"
}

variable "network" {
  description = "VPC network of the cluster."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork of the cluster (VPC-native, alias IP ranges created by GKE)."
  type        = string
  default     = "default"
}

variable "release_channel" {
  description = "GKE release channel."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "deletion_protection" {
  description = "Refuse terraform destroy of the cluster."
  type        = bool
  default     = true
}

variable "system_machine_type" {
  description = "Machine type of the on-demand pool running the runner manager and the cache proxy."
  type        = string
  default     = "e2-standard-4"
}

variable "system_min_nodes" {
  description = "Minimum nodes of the on-demand pool (whole pool)."
  type        = number
  default     = 1
}

variable "system_max_nodes" {
  description = "Maximum nodes of the on-demand pool (whole pool)."
  type        = number
  default     = 3
}

variable "spot_machine_type" {
  description = "Machine type of the spot pool running CI job pods."
  type        = string
  default     = "n2d-standard-8"
}

variable "spot_max_nodes" {
  description = "Maximum nodes of the spot pool; it scales to zero when no job runs."
  type        = number
  default     = 20

  validation {
    condition     = var.spot_max_nodes >= 1
    error_message = "spot_max_nodes must be at least 1."
  }
}

variable "spot_disk_size_gb" {
  description = "Boot disk of spot nodes (images and job emptyDirs live there)."
  type        = number
  default     = 200
}

variable "spot_taint" {
  description = "Taint spot nodes with cloud.google.com/gke-spot=true:NoSchedule so only pods tolerating it (job pods) land there."
  type        = bool
  default     = true
}

variable "cache_bucket_name" {
  description = "GCS bucket the cache proxy stores chunks and manifests in (globally unique)."
  type        = string
}

variable "runner_namespace" {
  description = "Kubernetes namespace of the spotrun Helm release."
  type        = string
  default     = "gitlab-runner"
}

variable "cache_proxy_service_account" {
  description = "Kubernetes ServiceAccount of the cache proxy (the chart's <fullname>-cache-proxy)."
  type        = string
  default     = "spotrun-cache-proxy"
}
