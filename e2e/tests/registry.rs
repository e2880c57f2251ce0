//! The embedded registry and root images against real containerd 1.6 through its CRI: an
//! ordinary image from a `StaticImages` registry runs on a CNI pod network, and the root image of
//! a Nix closure pulled into a nix-cri store runs the closure's program with the closure
//! bind-mounted read-only. containerd's image id for a root image is our config digest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use nix_cri::cache::{BinaryCacheClient, FetchConfig, SubstituterUrl};
use nix_cri::nix::{StorePath, TrustedKeys, VerifyingKey};
use nix_cri::registry::{NixImages, Registry, nix_image_reference};
use nix_cri::store::{Store, Substituter, SubstituterConfig, Wanted};
use nix_cri_e2e::containerd::{Containerd, image_spec, read_cri_log, remove_pod, wait_for_exit};
use nix_cri_e2e::{fixtures, nix_command, run};
use tonic::transport::Channel;

fn pod_config(name: &str, log_dir: &Path, host_network: bool) -> cri::PodSandboxConfig {
    let network = if host_network {
        cri::NamespaceMode::Node
    } else {
        cri::NamespaceMode::Pod
    };
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("{name}-uid"),
            namespace: "nix-cri-e2e".to_owned(),
            attempt: 0,
        }),
        // kubelet sets no hostname for host-network pods (runc refuses one without a UTS
        // namespace of their own).
        hostname: if host_network {
            String::new()
        } else {
            name.to_owned()
        },
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: network as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates and starts a container, waits for it to exit, and returns (exit code, output).
async fn run_to_completion(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod_id: &str,
    pod: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> anyhow::Result<(String, cri::ContainerStatus, String)> {
    let log = Path::new(&pod.log_directory).join(&config.log_path);
    let id = runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
    let status = wait_for_exit(runtime, &id, Duration::from_secs(30)).await?;
    let output = read_cri_log(&log)?;
    Ok((id, status, output))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ordinary_image_runs_on_a_pod_network() {
    let containerd = Containerd::start().await.unwrap();
    let mut images = containerd.images().await.unwrap();
    let mut runtime = containerd.runtime().await.unwrap();

    let busybox = containerd.busybox_image();
    let pulled = images
        .pull_image(cri::PullImageRequest {
            image: image_spec(busybox.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(containerd.is_image_id(&pulled.image_ref), "{pulled:?}");

    let log_dir = containerd.scratch_dir("busybox-pod").unwrap();
    let pod = pod_config("busybox-pod", &log_dir, false);
    let pod_id = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let pod_status = runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ip = pod_status.network.unwrap().ip;
    let subnet = containerd.pod_subnet();
    assert!(
        ip.starts_with(subnet.trim_end_matches("0/24")),
        "pod ip {ip:?} is not in {subnet}"
    );

    let (id, status, output) = run_to_completion(
        &mut runtime,
        &pod_id,
        &pod,
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "hello".to_owned(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: pulled.image_ref.clone(),
                user_specified_image: busybox.clone(),
                ..Default::default()
            }),
            command: vec!["/bin/sh".to_owned()],
            args: vec![
                "-c".to_owned(),
                "echo hello from busybox; id -u; ip -4 addr show eth0 | grep -c inet".to_owned(),
            ],
            log_path: "hello.log".to_owned(),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}\n{output}");
    assert_eq!(output, "hello from busybox\n0\n1\n");

    runtime
        .remove_container(cri::RemoveContainerRequest { container_id: id })
        .await
        .unwrap();
    remove_pod(&mut runtime, &pod_id).await.unwrap();
    images
        .remove_image(cri::RemoveImageRequest {
            image: image_spec(pulled.image_ref),
        })
        .await
        .unwrap();
}

/// A nix-cri store holding the closure of `top`, substituted from the cache at `url`.
async fn store_with_closure(root: &Path, url: &str, top: &str) -> (Arc<Store>, StorePath) {
    let store = Arc::new(Store::open(root).unwrap());
    let cache = Arc::new(
        BinaryCacheClient::new(
            vec![SubstituterUrl::parse(url).unwrap()],
            FetchConfig::default(),
        )
        .unwrap(),
    );
    let keys = TrustedKeys::new(vec![VerifyingKey::parse(fixtures().public_key()).unwrap()]);
    let substituter = Substituter::new(store.clone(), cache, SubstituterConfig::new(keys));
    let top = StorePath::from_absolute_path(top).unwrap();
    substituter
        .realise(&Wanted::Path(top.clone()), None)
        .await
        .unwrap();
    (store, top)
}

async fn store_with_main_closure(root: &Path) -> (Arc<Store>, StorePath) {
    let fx = fixtures();
    let url = format!("file://{}", fx.cache_dir("none").display());
    store_with_closure(root, &url, fx.closure("main")).await
}

/// Read-only bind mounts of every closure path that is not a symlink.
fn closure_mounts(store: &Store, top: &StorePath) -> Vec<cri::Mount> {
    store
        .closure(std::slice::from_ref(top))
        .unwrap()
        .iter()
        .filter(|path| {
            !store
                .real_path(path)
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        })
        .map(|path| cri::Mount {
            container_path: path.to_absolute_path(),
            host_path: store.real_path(path).display().to_string(),
            readonly: true,
            ..Default::default()
        })
        .collect()
}

async fn pull(images: &mut ImageServiceClient<Channel>, image: &str) -> String {
    images
        .pull_image(cri::PullImageRequest {
            image: image_spec(image.to_owned()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref
}

/// An image spec made with real Nix (`builtins.toFile` of `builtins.toJSON`) runs its
/// `Entrypoint`, and its `/bin` link reaches into the closure.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_spec_runs_its_entrypoint_with_its_links() {
    let fx = fixtures();
    let expr = format!(
        r#"let bb = builtins.storePath "{bb}"; hello = builtins.storePath "{hello}"; in
           builtins.toFile "image.json" (builtins.toJSON {{
             nixCriImage = 0;
             config = {{ Entrypoint = [ "${{hello}}/bin/hello" ]; Env = [ "PATH=/bin" ]; User = "0"; }};
             links = {{ "/bin" = "${{bb}}/bin"; }};
           }})"#,
        bb = fx.path("busybox"),
        hello = fx.path("executable"),
    );
    let output = run(nix_command("nix-instantiate").args([
        "--eval",
        "--read-write-mode",
        "--json",
        "-E",
        &expr,
    ]))
    .unwrap();
    let spec_path: String = serde_json::from_slice(&output.stdout).unwrap();
    // Publish its closure in a cache of its own, signed by the fixture key.
    let cache = tempfile::tempdir().unwrap();
    let url = format!("file://{}", cache.path().display());
    run(nix_command("nix").args([
        "copy",
        "--to",
        &format!("{url}?compression=none"),
        &spec_path,
    ]))
    .unwrap();
    run(nix_command("nix").args([
        "store",
        "sign",
        "--store",
        &url,
        "--key-file",
        fx.secret_key_file(),
        "-r",
        &spec_path,
    ]))
    .unwrap();

    let store_root = tempfile::tempdir().unwrap();
    let (store, top) = store_with_closure(store_root.path(), &url, &spec_path).await;
    let nix_images = Arc::new(NixImages::new(store.clone()));
    let ours = nix_images.image_for(&top).unwrap();
    assert_eq!(ours.user_ids(), (Some(0), None));
    let registry = Registry::start("127.0.0.1:0".parse().unwrap(), nix_images.clone())
        .await
        .unwrap();
    let reference = nix_image_reference(&registry.local_addr(), &top.hash());

    let containerd = Containerd::start().await.unwrap();
    let mut images = containerd.images().await.unwrap();
    let mut runtime = containerd.runtime().await.unwrap();
    let image_ref = pull(&mut images, &reference).await;
    assert_eq!(image_ref, containerd.image_id(ours.id()));

    let log_dir = containerd.scratch_dir("spec-pod").unwrap();
    let pod = pod_config("spec-pod", &log_dir, true);
    let pod_id = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let mounts = closure_mounts(&store, &top);
    let container = |name: &str, command: &[&str]| cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        // As kubelet sends it: the id, and the pod's own string (CRI-O needs the latter).
        image: Some(cri::ImageSpec {
            image: image_ref.clone(),
            user_specified_image: reference.clone(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        mounts: mounts.clone(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    };
    // No command: the image's Entrypoint runs.
    let (_, status, output) =
        run_to_completion(&mut runtime, &pod_id, &pod, container("entry", &[]))
            .await
            .unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}\n{output}");
    assert_eq!(output, fx.manifest["expected_stdout"].as_str().unwrap());
    // `sh` is found through PATH=/bin and the /bin link.
    let (_, status, output) = run_to_completion(
        &mut runtime,
        &pod_id,
        &pod,
        container("link", &["sh", "-c", "readlink /bin; echo linked"]),
    )
    .await
    .unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}\n{output}");
    assert_eq!(output, format!("{}/bin\nlinked\n", fx.path("busybox")));
    remove_pod(&mut runtime, &pod_id).await.unwrap();
    drop(containerd);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_image_runs_a_closure_from_the_store() {
    let fx = fixtures();
    let executable = fx.manifest["executable_bin"].as_str().unwrap();
    let expected = fx.manifest["expected_stdout"].as_str().unwrap();
    let store_root = tempfile::tempdir().unwrap();
    let (store, top) = store_with_main_closure(store_root.path()).await;
    let nix_images = Arc::new(NixImages::new(store.clone()));
    let ours = nix_images.image_for(&top).unwrap();
    let registry = Registry::start("127.0.0.1:0".parse().unwrap(), nix_images.clone())
        .await
        .unwrap();
    let reference = nix_image_reference(&registry.local_addr(), &top.hash());

    let containerd = Containerd::start().await.unwrap();
    let mut images = containerd.images().await.unwrap();
    let mut runtime = containerd.runtime().await.unwrap();
    let pulled = images
        .pull_image(cri::PullImageRequest {
            image: image_spec(reference.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The one rule: the runtime's id for the root image is its config digest (spelt as the
    // runtime spells ids).
    assert_eq!(pulled.image_ref, containerd.image_id(ours.id()));

    for by in [containerd.image_id(ours.id()), reference.clone()] {
        let image = images
            .image_status(cri::ImageStatusRequest {
                image: image_spec(by.clone()),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap_or_else(|| panic!("ImageStatus({by}) found nothing"));
        assert_eq!(image.id, containerd.image_id(ours.id()));
        assert_eq!(image.repo_tags, std::slice::from_ref(&reference));
        let repo = reference.rsplit_once(':').unwrap().0;
        assert_eq!(
            image.repo_digests,
            [format!("{repo}@{}", ours.manifest_digest())]
        );
        assert!(image.size > 0);
        assert_eq!(image.uid, None);
        assert_eq!(image.username, "");
    }

    // Mount the closure as nix-cri will: each path read-only at its own place.
    let closure = store.closure(std::slice::from_ref(&top)).unwrap();
    let mut mounts = Vec::new();
    let mut symlinks = Vec::new();
    for path in &closure {
        let host = store.real_path(path);
        // containerd resolves a symlink host_path on the host (so into the host's /nix/store);
        // such paths need another way in (see docs/images.md), not a bind mount.
        if host.symlink_metadata().unwrap().file_type().is_symlink() {
            symlinks.push(path.to_absolute_path());
            continue;
        }
        mounts.push(cri::Mount {
            container_path: path.to_absolute_path(),
            host_path: host.display().to_string(),
            readonly: true,
            ..Default::default()
        });
    }
    assert_eq!(symlinks, [fx.path("single_symlink")]);

    let log_dir = containerd.scratch_dir("nix-pod").unwrap();
    let pod = pod_config("nix-pod", &log_dir, true);
    let pod_id = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let container = |name: &str, command: Vec<String>| cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: pulled.image_ref.clone(),
            user_specified_image: format!("nix:0{top}"),
            ..Default::default()
        }),
        command,
        log_path: format!("{name}.log"),
        mounts: mounts.clone(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    };

    let (id, status, output) = run_to_completion(
        &mut runtime,
        &pod_id,
        &pod,
        container("hello", vec![executable.to_owned()]),
    )
    .await
    .unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}\n{output}");
    assert_eq!(output, expected);
    // containerd 1.6 reports the image as repo@manifest-digest and leaves image_id empty.
    let repo = reference.rsplit_once(':').unwrap().0;
    assert_eq!(
        status.image_ref,
        format!("{repo}@{}", ours.manifest_digest())
    );

    // The root layer as the container sees it; the store is read-only.
    let busybox = format!("{}/bin/busybox", fx.path("busybox"));
    let script = format!(
        "cd / && {busybox} ls -ld etc/passwd etc/group tmp root nix/store | {busybox} awk '{{print $1, $NF}}'; \
         {busybox} cat /etc/passwd; echo PATH=$PATH; \
         {busybox} touch {top}/x 2>/dev/null || echo read-only"
    );
    let (id2, status, output) = run_to_completion(
        &mut runtime,
        &pod_id,
        &pod,
        container(
            "look",
            vec![
                format!("{}/bin/sh", fx.path("busybox")),
                "-c".to_owned(),
                script,
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}\n{output}");
    let mut lines = output.lines();
    let listing: HashMap<&str, &str> = lines
        .by_ref()
        .take(5)
        .map(|l| {
            let (mode, name) = l.split_once(' ').unwrap();
            (name, mode)
        })
        .collect();
    assert_eq!(listing["etc/passwd"], "-rw-r--r--", "{output}");
    assert_eq!(listing["etc/group"], "-rw-r--r--", "{output}");
    assert_eq!(listing["tmp"], "drwxrwxrwt", "{output}");
    assert_eq!(listing["root"], "drwx------", "{output}");
    assert_eq!(listing["nix/store"], "drwxr-xr-x", "{output}");
    let rest: Vec<&str> = lines.collect();
    assert!(rest[0].starts_with("root:x:0:0:"), "{output}");
    assert_eq!(rest.last(), Some(&"read-only"), "{output}");
    assert!(
        rest.contains(&format!("PATH={top}/bin").as_str()),
        "the plain image's PATH is missing: {output}"
    );

    for container_id in [id, id2] {
        runtime
            .remove_container(cri::RemoveContainerRequest { container_id })
            .await
            .unwrap();
    }
    remove_pod(&mut runtime, &pod_id).await.unwrap();
    images
        .remove_image(cri::RemoveImageRequest {
            image: image_spec(containerd.image_id(ours.id())),
        })
        .await
        .unwrap();
    let gone = images
        .image_status(cri::ImageStatusRequest {
            image: image_spec(containerd.image_id(ours.id())),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.image.is_none());
    drop(containerd);
    registry.shutdown().await;
}
