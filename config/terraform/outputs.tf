output "cluster_name" {
  description = "Name of the GKE cluster."
  value       = google_container_cluster.spotrun.name
}

output "cluster_location" {
  description = "Region or zone of the cluster."
  value       = google_container_cluster.spotrun.location
}

output "get_credentials" {
  description = "Command that points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.spotrun.name} --location ${google_container_cluster.spotrun.location} --project ${var.project_id}"
}

output "cache_bucket" {
  description = "GCS bucket for cacheProxy.backend.gcs.bucket."
  value       = google_storage_bucket.cache.name
}

output "cache_proxy_gcp_service_account" {
  description = "Google service account for cacheProxy.backend.gcs.workloadIdentityServiceAccount."
  value       = google_service_account.cache_proxy.email
}

output "helm_values" {
  description = "Chart values that match this cluster."
  value = yamlencode({
    cacheProxy = {
      backend = {
        type = "gcs"
        gcs = {
          bucket                         = google_storage_bucket.cache.name
          workloadIdentityServiceAccount = google_service_account.cache_proxy.email
        }
      }
    }
  })
}
