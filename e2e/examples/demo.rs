//! The demo behind `hack/demo`: a real `nix:` pod on real containerd, driven through nix-cri
//! the way kubelet drives a runtime. It prints every step.
//!
//! The image is the fixture image spec (hack/fixtures/fixtures.nix, `image`): a JSON file built
//! by Nix whose entrypoint is a script in the closure and whose `/bin` links to busybox.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use k8s_cri::v1 as cri;
use nix_cri_e2e::containerd::{
    Containerd, RuntimeKind, image_client, image_spec, remove_pod, runtime_client,
};
use nix_cri_e2e::{CacheServer, NixCriServer, fixtures};

fn step(text: &str) {
    println!("==> {text}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let fx = fixtures();
    let image_path = fx.closure("image");

    // containerd 2.x unless NIX_CRI_E2E_RUNTIME names another (crio, containerd1.6).
    let kind = RuntimeKind::from_env()?;
    step(&format!(
        "starting {kind} (its own root, state and socket; CNI bridge networking)"
    ));
    let containerd = Containerd::start_with(kind, &Default::default())
        .await
        .with_context(|| format!("start {kind}"))?;
    step("serving the signed xz binary cache Nix wrote, on loopback");
    let cache = CacheServer::start(fx.cache_dir("xz")).await?;
    step(&format!(
        "starting nix-cri serve in front of {}",
        containerd.socket().display()
    ));
    let nix_cri = NixCriServer::start(containerd.socket(), &cache.url(), &[]).await?;
    let mut images = image_client(&nix_cri.socket).await?;
    let mut runtime = runtime_client(&nix_cri.socket).await?;

    let pod_image = format!("nix:0{image_path}:latest");
    step(&format!("PullImage {pod_image}"));
    let image_id = images
        .pull_image(cri::PullImageRequest {
            image: image_spec(pod_image.clone()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("pull failed; nix-cri log:\n{}", nix_cri.log_tail()))?
        .into_inner()
        .image_ref;
    println!("    image id {image_id}");
    let status = images
        .image_status(cri::ImageStatusRequest {
            image: image_spec(image_id.clone()),
            verbose: false,
        })
        .await?
        .into_inner();
    if let Some(image) = status.image {
        println!("    {} bytes, tags {:?}", image.size, image.repo_tags);
    }

    let logs = tempfile::tempdir()?;
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "nix-demo".into(),
            uid: "nix-cri-demo-pod".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "nix-demo".into(),
        log_directory: logs.path().display().to_string(),
        labels: HashMap::from([("app".into(), "nix-demo".into())]),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    step("RunPodSandbox with runtime handler \"nix\" (RuntimeClass nix)");
    let sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: "nix".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    step("CreateContainer from the nix image (no command: the image spec's entrypoint runs)");
    let container = runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "hello".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image_id.clone(),
                    user_specified_image: pod_image.clone(),
                    ..Default::default()
                }),
                log_path: "hello.log".into(),
                linux: Some(cri::LinuxContainerConfig::default()),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .with_context(|| format!("create failed; nix-cri log:\n{}", nix_cri.log_tail()))?
        .into_inner()
        .container_id;
    runtime
        .start_container(cri::StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .with_context(|| {
            format!(
                "start failed; containerd log:\n{}",
                containerd.diagnostics()
            )
        })?;
    for _ in 0..100 {
        let state = runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .map(|s| s.state)
            .unwrap_or_default();
        if state == cri::ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    step("the pod's output (its CRI log):");
    print!(
        "{}",
        std::fs::read_to_string(logs.path().join("hello.log"))?
    );

    step("cleaning up: RemoveContainer, RemovePodSandbox, RemoveImage");
    runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: container,
        })
        .await?;
    remove_pod(&mut runtime, &sandbox).await?;
    images
        .remove_image(cri::RemoveImageRequest {
            image: image_spec(image_id),
        })
        .await?;
    step("done");
    Ok(())
}
