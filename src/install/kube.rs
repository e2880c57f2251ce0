//! The node label through the Kubernetes API, from inside a pod: a JSON merge patch of
//! `metadata.labels` on the node, with the pod's service-account token and CA.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::InstallError;
use super::host::{NoLabeler, NodeLabeler};

/// The label that says nix-cri is installed and answering on a node. The chart's RuntimeClass
/// selects nodes with `nix-cri.io/ready=true`.
pub const READY_LABEL: &str = "nix-cri.io/ready";
/// Where a pod finds its service account's token and the cluster's CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The same label value is not patched again within this time (the watch loop labels on
/// every pass).
const REPATCH_AFTER: Duration = Duration::from_secs(600);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// `nix-cri.io/ready=true`, `…=false`, or `nix-cri.io/ready-` (removed), for messages.
pub fn label_text(ready: Option<bool>) -> String {
    match ready {
        Some(ready) => format!("{READY_LABEL}={ready}"),
        None => format!("{READY_LABEL}-"),
    }
}

/// The merge patch that sets (or with `None`, removes) the label.
pub fn label_patch(ready: Option<bool>) -> String {
    let value = match ready {
        Some(ready) => serde_json::Value::String(ready.to_string()),
        None => serde_json::Value::Null,
    };
    serde_json::json!({ "metadata": { "labels": { READY_LABEL: value } } }).to_string()
}

/// The labeler for this process: the API in a cluster (`KUBERNETES_SERVICE_HOST` set),
/// otherwise one that logs and skips.
pub fn labeler_from_env(node: Option<String>) -> Result<Box<dyn NodeLabeler>, InstallError> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Ok(Box::new(NoLabeler));
    };
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
    let node = node
        .filter(|n| !n.is_empty())
        .ok_or(InstallError::NoNodeName)?;
    Ok(Box::new(KubeNodeLabeler::new(
        &host,
        &port,
        node,
        Path::new(SERVICE_ACCOUNT_DIR),
    )?))
}

/// The real [`NodeLabeler`]: PATCH `/api/v1/nodes/NODE` over TLS verified with the service
/// account's CA. The token is read on every request (kubelet rotates it).
pub struct KubeNodeLabeler {
    node: String,
    url: String,
    token_path: PathBuf,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    last: Mutex<Option<(Option<bool>, Instant)>>,
}

impl KubeNodeLabeler {
    pub fn new(
        host: &str,
        port: &str,
        node: String,
        service_account: &Path,
    ) -> Result<Self, InstallError> {
        let ca_path = service_account.join("ca.crt");
        let label_err = |why: String| InstallError::Label {
            node: node.clone(),
            label: READY_LABEL.to_owned(),
            why,
        };
        let pem = std::fs::read(&ca_path).map_err(InstallError::io("read", &ca_path))?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| label_err(format!("{}: {e}", ca_path.display())))?;
            roots
                .add(cert)
                .map_err(|e| label_err(format!("{}: {e}", ca_path.display())))?;
        }
        if roots.is_empty() {
            return Err(label_err(format!(
                "{} holds no certificate",
                ca_path.display()
            )));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| label_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let url = format!("https://{host}:{port}/api/v1/nodes/{node}");
        Ok(Self {
            node,
            url,
            token_path: service_account.join("token"),
            client: Client::builder(TokioExecutor::new()).build(https),
            last: Mutex::new(None),
        })
    }

    async fn patch(&self, ready: Option<bool>) -> Result<(), InstallError> {
        let label_err = |why: String| InstallError::Label {
            node: self.node.clone(),
            label: label_text(ready),
            why,
        };
        let token = std::fs::read_to_string(&self.token_path)
            .map_err(InstallError::io("read", &self.token_path))?;
        let request = http::Request::patch(&self.url)
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(
                http::header::USER_AGENT,
                concat!("nix-cri-installer/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(label_patch(ready))))
            .map_err(|e| label_err(format!("{}: {e}", self.url)))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| label_err(format!("PATCH {}: no answer in 15s", self.url)))?
            .map_err(|e| label_err(format!("PATCH {}: {e:?}", self.url)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned();
        Err(label_err(format!(
            "PATCH {} answered {status}: {body}",
            self.url
        )))
    }
}

impl NodeLabeler for KubeNodeLabeler {
    fn set_ready(&self, ready: Option<bool>) -> BoxFuture<'_, Result<(), InstallError>> {
        Box::pin(async move {
            let recent = self
                .last
                .lock()
                .ok()
                .and_then(|last| *last)
                .is_some_and(|(value, at)| value == ready && at.elapsed() < REPATCH_AFTER);
            if recent {
                return Ok(());
            }
            self.patch(ready).await?;
            tracing::info!(node = %self.node, label = %label_text(ready), "node labelled");
            if let Ok(mut last) = self.last.lock() {
                *last = Some((ready, Instant::now()));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches() {
        assert_eq!(
            label_patch(Some(true)),
            r#"{"metadata":{"labels":{"nix-cri.io/ready":"true"}}}"#
        );
        assert_eq!(
            label_patch(None),
            r#"{"metadata":{"labels":{"nix-cri.io/ready":null}}}"#
        );
    }
}
