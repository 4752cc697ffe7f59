# An example GKE Standard cluster for spotrun: an autoscaling on-demand pool for the runner manager and
# the cache proxy, a spot pool that scales from zero for CI job pods, Workload Identity, and a GCS
# bucket the cache proxy reaches through Workload Identity.

provider "google" {
  project = var.project_id
  region  = var.region
}

locals {
  location = var.zone != null ? var.zone : var.region

  oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
}

resource "google_container_cluster" "spotrun" {
  name     = var.cluster_name
  location = local.location

  # Node pools are managed below; GKE needs a default pool at creation, removed right after.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection

  network         = var.network
  subnetwork      = var.subnetwork
  networking_mode = "VPC_NATIVE"

  ip_allocation_policy {}

  # Dataplane V2 enforces NetworkPolicy (the chart's cacheProxy.networkPolicy).
  datapath_provider = "ADVANCED_DATAPATH"

  release_channel {
    channel = var.release_channel
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }
}

# On-demand nodes: the runner manager (a reclaimed manager loses every running job) and the cache proxy.
resource "google_container_node_pool" "system" {
  name               = "system"
  cluster            = google_container_cluster.spotrun.id
  location           = local.location
  initial_node_count = 1

  autoscaling {
    total_min_node_count = var.system_min_nodes
    total_max_node_count = var.system_max_nodes
    location_policy      = "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = var.system_machine_type
    disk_type    = "pd-balanced"
    disk_size_gb = 100
    spot         = false
    oauth_scopes = local.oauth_scopes

    labels = {
      "spotrun.dev/pool" = "system"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

# Spot nodes for CI job pods, from zero. GKE labels them cloud.google.com/gke-spot=true; the executor's
# spot policy selects them and tolerates the optional taint.
resource "google_container_node_pool" "spot" {
  name               = "spot-jobs"
  cluster            = google_container_cluster.spotrun.id
  location           = local.location
  initial_node_count = 0

  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.spot_max_nodes
    location_policy      = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = var.spot_machine_type
    disk_type    = "pd-ssd"
    disk_size_gb = var.spot_disk_size_gb
    spot         = true
    oauth_scopes = local.oauth_scopes

    labels = {
      "spotrun.dev/pool" = "spot-jobs"
    }

    dynamic "taint" {
      for_each = var.spot_taint ? [1] : []

      content {
        key    = "cloud.google.com/gke-spot"
        value  = "true"
        effect = "NO_SCHEDULE"
      }
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

# The cache proxy's backend: chunks and manifests, reached with the proxy's own identity (no keys).
resource "google_storage_bucket" "cache" {
  name                        = var.cache_bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  lifecycle_rule {
    condition {
      age = 1
    }

    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }
}

resource "google_service_account" "cache_proxy" {
  account_id   = "spotrun-cache-proxy"
  display_name = "spotrun cache proxy"
}

resource "google_storage_bucket_iam_member" "cache_proxy" {
  bucket = google_storage_bucket.cache.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.cache_proxy.email}"
}

# Lets the proxy's Kubernetes ServiceAccount act as the Google service account (Workload Identity).
resource "google_service_account_iam_member" "cache_proxy_workload_identity" {
  service_account_id = google_service_account.cache_proxy.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.runner_namespace}/${var.cache_proxy_service_account}]"

  depends_on = [google_container_cluster.spotrun]
}
