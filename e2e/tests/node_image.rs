//! The DaemonSet's container image (`hack/image`): built without a container engine, imported
//! into real containerd, and run through nix-cri's CRI socket as kubelet would run it.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_cri::v1 as cri;
use nix_cri_e2e::containerd::{
    Containerd, RuntimeKind, image_client, read_cri_log, runtime_client, wait_for_exit,
};
use nix_cri_e2e::{CacheServer, NixCriServer, fixtures, run, workspace};

/// Runs `hack/image` (a static release build, so minutes on a cold cache) and returns the
/// archive and the reference it names.
fn build_image() -> (std::path::PathBuf, String) {
    let out = workspace().join("target/node-image");
    let output = run(Command::new(workspace().join("hack/image")).arg(&out))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let reference = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (out.join("nix-cri-image.tar"), reference)
}

fn import(containerd: &Containerd, archive: &Path) {
    run(Command::new("ctr")
        .arg("--address")
        .arg(containerd.socket())
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(archive))
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_image_runs_nix_cri_through_the_cri() {
    let (archive, reference) = build_image();
    assert_eq!(
        reference,
        format!("ghcr.io/nix-cri/nix-cri:{}", env!("CARGO_PKG_VERSION")),
        "the chart's default image"
    );
    let fx = fixtures();
    // Always containerd (2.x, unless the suite runs on 1.6), whatever NIX_CRI_E2E_RUNTIME
    // says: the image gets in with `ctr images import`, and CRI-O has no way to import an
    // archive through its socket. What this test checks is the image, not the runtime.
    let kind = match RuntimeKind::from_env().expect("NIX_CRI_E2E_RUNTIME") {
        RuntimeKind::Crio => RuntimeKind::Containerd2,
        kind => kind,
    };
    let containerd = Containerd::start_with(kind, &serde_json::Map::new())
        .await
        .expect("start containerd");
    import(&containerd, &archive);
    let cache = CacheServer::start(fx.cache_dir("zstd")).await.unwrap();
    let nix_cri = NixCriServer::start(containerd.socket(), &cache.url(), &[])
        .await
        .unwrap();
    let mut images = image_client(&nix_cri.socket).await.unwrap();
    let mut runtime = runtime_client(&nix_cri.socket).await.unwrap();

    // kubelet finds the imported image (pull policy IfNotPresent) through nix-cri.
    let image = images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: reference.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap_or_else(|| panic!("{reference} is not in containerd after the import"));
    assert!(image.repo_tags.contains(&reference), "{image:?}");

    let logs = containerd.scratch_dir("node-image").unwrap();
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "nix-cri-node".into(),
            uid: "node-image-e2e".into(),
            namespace: "kube-system".into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        labels: HashMap::from([("app".into(), "nix-cri".into())]),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.diagnostics()))
        .into_inner()
        .pod_sandbox_id;

    // The image's entrypoint is nix-cri; `args` alone run it, as a pod spec's `args` would.
    // It runs with no libc in the image: the binary is static.
    let pod = Pod {
        sandbox,
        sandbox_config,
        image_id: image.id.clone(),
        reference: reference.clone(),
    };
    let code = pod.run(&mut runtime, "version", &[], &["--version"]).await;
    let output = read_cri_log(&logs.join("version.log")).unwrap();
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        output.trim(),
        format!("nix-cri {}", env!("CARGO_PKG_VERSION"))
    );

    // What the DaemonSet needs besides nix-cri: a shell and nsenter for the host's systemctl.
    let code = pod
        .run(
            &mut runtime,
            "tools",
            &["/bin/sh", "-c"],
            &["test -x /bin/nsenter && nix-cri install --help | grep -q -- --host-root && echo tools-ok"],
        )
        .await;
    let output = read_cri_log(&logs.join("tools.log")).unwrap();
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("tools-ok"), "{output}");

    containerd.remove_all_pods().await.unwrap();
}

/// A pod sandbox running the node image, as kubelet set it up.
struct Pod {
    sandbox: String,
    sandbox_config: cri::PodSandboxConfig,
    image_id: String,
    reference: String,
}

impl Pod {
    /// Creates and starts a container of the image, waits for it to exit, returns its code.
    async fn run(
        &self,
        runtime: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
        name: &str,
        command: &[&str],
        args: &[&str],
    ) -> i32 {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let id = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: self.sandbox.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: self.image_id.clone(),
                        user_specified_image: self.reference.clone(),
                        ..Default::default()
                    }),
                    command: strings(command),
                    args: strings(args),
                    log_path: format!("{name}.log"),
                    linux: Some(cri::LinuxContainerConfig::default()),
                    ..Default::default()
                }),
                sandbox_config: Some(self.sandbox_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
            .into_inner()
            .container_id;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        wait_for_exit(runtime, &id, Duration::from_secs(30))
            .await
            .unwrap()
            .exit_code
    }
}
