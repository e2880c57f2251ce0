//! nix-cri's admin API (`proto/nixcri/admin/v1/admin.proto`), served on the CRI socket.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tonic::Status;
use tower::ServiceExt;

use super::Proxy;
use super::grpc::{self, Body};
use crate::store::RootKind;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("nixcri.admin.v1");
}

pub use proto::admin_client::AdminClient;
use proto::admin_server::{Admin, AdminServer};

pub const SERVICE: &str = "nixcri.admin.v1.Admin";

pub type Server = AdminServer<AdminService>;

pub fn server(proxy: Arc<Proxy>) -> Server {
    AdminServer::new(AdminService { proxy })
}

/// Answers one admin call. Admin calls are unary and small, so the request is read whole
/// first: tonic then gets a body with no error type to convert.
pub async fn call(server: Server, request: Request<Body>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = match super::read_body(body).await {
        Ok((body, _)) => body,
        Err(err) => {
            return grpc::status_response(
                tonic::Code::InvalidArgument,
                &format!("cannot read request: {err}"),
            );
        }
    };
    let request = Request::from_parts(parts, http_body_util::Full::new(body));
    match server.oneshot(request).await {
        Ok(response) => response.map(grpc::boxed),
        Err(never) => match never {},
    }
}

pub struct AdminService {
    proxy: Arc<Proxy>,
}

fn internal(err: impl std::fmt::Display) -> Status {
    Status::internal(err.to_string())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_images(
        &self,
        _: tonic::Request<proto::ListImagesRequest>,
    ) -> Result<tonic::Response<proto::ListImagesResponse>, Status> {
        let proxy = self.proxy.clone();
        let images = tokio::task::spawn_blocking(move || {
            let roots = proxy.store.roots().map_err(internal)?;
            let images = proxy.nix_images().map_err(|e| internal(e.message()))?;
            images
                .into_iter()
                .map(|image| {
                    let closure = proxy
                        .store
                        .closure(std::slice::from_ref(&image.top))
                        .map_err(internal)?;
                    let closure_nar_size =
                        proxy.store.closure_nar_size(&image.top).map_err(internal)?;
                    Ok(proto::NixImage {
                        reference: format!("nix:0{}", image.top),
                        store_path: image.top.to_absolute_path(),
                        closure_paths: closure.len() as u64,
                        closure_nar_size,
                        containers: roots
                            .iter()
                            .filter(|(name, path)| {
                                name.kind() == RootKind::Container && *path == image.top
                            })
                            .map(|(name, _)| name.holder().to_owned())
                            .collect(),
                        id: image.id,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()
        })
        .await
        .map_err(internal)??;
        Ok(tonic::Response::new(proto::ListImagesResponse { images }))
    }

    async fn list_roots(
        &self,
        _: tonic::Request<proto::ListRootsRequest>,
    ) -> Result<tonic::Response<proto::ListRootsResponse>, Status> {
        let store = self.proxy.store.clone();
        let roots = tokio::task::spawn_blocking(move || store.roots())
            .await
            .map_err(internal)?
            .map_err(internal)?;
        Ok(tonic::Response::new(proto::ListRootsResponse {
            roots: roots
                .into_iter()
                .map(|(name, path)| proto::Root {
                    kind: name.kind().dir_name().to_owned(),
                    holder: name.holder().to_owned(),
                    store_path: path.to_absolute_path(),
                })
                .collect(),
        }))
    }

    async fn collect_garbage(
        &self,
        request: tonic::Request<proto::CollectGarbageRequest>,
    ) -> Result<tonic::Response<proto::CollectGarbageResponse>, Status> {
        let dry_run = request.into_inner().dry_run;
        let store = self.proxy.store.clone();
        let report = tokio::task::spawn_blocking(move || store.gc(dry_run))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        Ok(tonic::Response::new(proto::CollectGarbageResponse {
            dead: report.dead.iter().map(|p| p.to_absolute_path()).collect(),
            nar_bytes: report.nar_bytes,
            disk_bytes_freed: report.disk_bytes_freed,
            views_removed: report.views_removed as u64,
        }))
    }

    async fn status(
        &self,
        _: tonic::Request<proto::StatusRequest>,
    ) -> Result<tonic::Response<proto::StatusResponse>, Status> {
        let store = self.proxy.store.clone();
        let usage = tokio::task::spawn_blocking(move || store.usage())
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let mut runtime = self.proxy.upstream.runtime();
        let version = runtime.version(k8s_cri::v1::VersionRequest::default());
        let upstream_error = match tokio::time::timeout(Duration::from_secs(2), version).await {
            Ok(Ok(_)) => String::new(),
            Ok(Err(status)) => status.message().to_owned(),
            Err(_) => "no answer within 2s".to_owned(),
        };
        Ok(tonic::Response::new(proto::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store_root: self.proxy.store.root().display().to_string(),
            store_nar_bytes: usage.nar_bytes,
            store_paths: usage.paths,
            upstream_socket: self.proxy.upstream.socket().display().to_string(),
            upstream_ready: upstream_error.is_empty(),
            upstream_error,
            registry: self.proxy.config.registry_addr.to_string(),
            runtime_handler: self.proxy.config.runtime_handler.clone(),
        }))
    }
}
