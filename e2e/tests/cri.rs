//! nix-cri in front of real containerd 1.6 + runc, driven through the CRI the way kubelet
//! drives it, with the fixture cache on loopback and CNI bridge networking.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use nix_cri::cri::SANDBOX_ANNOTATION;
use nix_cri_e2e::containerd::{
    Containerd, RuntimeKind, image_client, image_spec, remove_pod, runtime_client,
};
use nix_cri_e2e::{
    CacheServer, GoCall, GoResult, GrpcGoCaller, NixCriServer, fixtures, http_get, nix_command, run,
};
use prost::Message;
use tonic::transport::Channel;

const POD_UID: &str = "0b6a1c8e-nix-cri-e2e";

fn sandbox_config(name: &str, log_dir: &std::path::Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{POD_UID}-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([("app".into(), name.into())]),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

fn container_config(
    name: &str,
    image_id: &str,
    user_specified: &str,
    command: &[&str],
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image_id.into(),
            user_specified_image: user_specified.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// Waits for a container to exit and returns its exit code.
async fn wait_exit(
    runtime: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    id: &str,
) -> i32 {
    for _ in 0..100 {
        let status = runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if status.state == cri::ContainerState::ContainerExited as i32 {
            return status.exit_code;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("container {id} did not exit");
}

/// The events of a `GetContainerEvents` stream for the container whose id is put in
/// `container`, up to its started event (within 60 s).
async fn container_events(
    mut runtime: RuntimeServiceClient<Channel>,
    container: Arc<OnceLock<String>>,
) -> Result<Vec<(String, i32)>, tonic::Status> {
    let events = async move {
        let mut stream = runtime
            .get_container_events(cri::GetEventsRequest::default())
            .await?
            .into_inner();
        let mut seen = Vec::new();
        while let Some(event) = stream.message().await? {
            if container.get() == Some(&event.container_id) {
                seen.push((event.container_id, event.container_event_type));
                if event.container_event_type
                    == cri::ContainerEventType::ContainerStartedEvent as i32
                {
                    return Ok(seen);
                }
            }
        }
        Ok(seen)
    };
    tokio::time::timeout(Duration::from_secs(60), events)
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(
                "no started event within 60 s",
            ))
        })
}

/// Each grpc-go call's one message, decoded; every call must have succeeded with one.
fn decoded<M: Message + Default>(all: &[GoResult]) -> Vec<M> {
    all.iter()
        .map(|r| match (r.code, &r.messages[..]) {
            (0, [message]) => M::decode(message.data.as_deref().unwrap_or_default()).unwrap(),
            _ => panic!("not one message: {r:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nix_pod_runs_on_real_containerd_like_kubelet_drives_it() {
    let fx = fixtures();
    let containerd = Containerd::start().await.expect("start containerd");
    let cache = CacheServer::start(fx.cache_dir("xz")).await.unwrap();
    let nix_cri = NixCriServer::start(containerd.socket(), &cache.url(), &[])
        .await
        .unwrap();
    let mut images = image_client(&nix_cri.socket).await.unwrap();
    let mut runtime = runtime_client(&nix_cri.socket).await.unwrap();

    let top = fx.closure("main");
    let pod_image = format!("nix:0{top}:latest");

    // kubelet: ImageStatus (absent) → PullImage → ImageStatus by id.
    let status = images
        .image_status(cri::ImageStatusRequest {
            image: image_spec(&pod_image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_none(), "nothing pulled yet");
    let image_id = images
        .pull_image(cri::PullImageRequest {
            image: image_spec(&pod_image),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("pull: {e}\n{}", nix_cri.log_tail()))
        .into_inner()
        .image_ref;
    assert!(containerd.is_image_id(&image_id), "{image_id}");
    let by_id = images
        .image_status(cri::ImageStatusRequest {
            image: image_spec(&image_id),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let image = by_id.image.expect("the pulled image has a status");
    assert_eq!(image.id, image_id);
    assert!(image.size > 0);
    assert!(by_id.info["info"].contains(top), "{:?}", by_id.info);
    let by_reference = images
        .image_status(cri::ImageStatusRequest {
            image: image_spec(&pod_image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_reference.image.unwrap().id, image_id);

    // The pull shows in /metrics; nix-cri is healthy and ready (store open, runtime answering).
    let (status, metrics) = http_get(nix_cri.metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        "nix_cri_pulls_total{result=\"success\"} 1",
        "nix_cri_paths_substituted_total 19",
        "nix_cri_cri_requests_total{code=\"Ok\",method=\"PullImage\"} 1",
        "nix_cri_store_paths 19",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("nix_cri_fetched_bytes_total{compression=\"xz\""),
        "{metrics}"
    );
    assert_eq!(http_get(nix_cri.metrics, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(nix_cri.metrics, "/readyz").unwrap().0, 200);

    // The id is the one containerd itself has for the root image.
    let upstream_images = image_client(containerd.socket())
        .await
        .unwrap()
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(
        upstream_images.iter().any(|i| i.id == image_id),
        "{upstream_images:?}"
    );
    // Through nix-cri the image shows once, under its nix reference.
    let listed = images
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    let ours: Vec<_> = listed.iter().filter(|i| i.id == image_id).collect();
    assert_eq!(ours.len(), 1, "{listed:?}");
    assert_eq!(ours[0].repo_tags, vec![format!("nix:0{top}")]);

    // A pod that opted in through the RuntimeClass handler.
    let logs = tempfile::tempdir().unwrap();
    let sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config("nix-pod", logs.path())),
            runtime_handler: "nix".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("sandbox: {e}\n{}", containerd.diagnostics()))
        .into_inner()
        .pod_sandbox_id;
    let sandbox_status = runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ip = sandbox_status.network.map(|n| n.ip).unwrap_or_default();
    assert!(!ip.is_empty(), "CNI gave the pod an address");

    // kubelet's event stream, subscribed to straight and through nix-cri before the container
    // is made: both must see the same events of it (containerd 2.x and CRI-O), or the same
    // Unimplemented (containerd 1.6 predates it; kubelet then falls back to polling).
    // Streaming itself is covered against a scripted runtime in contract.rs.
    let hello_id = Arc::new(OnceLock::new());
    let events_direct = tokio::spawn(container_events(
        runtime_client(containerd.socket()).await.unwrap(),
        hello_id.clone(),
    ));
    let events_proxied = tokio::spawn(container_events(runtime.clone(), hello_id.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The closure's program runs and prints.
    let program = fx.str_at("/executable_bin");
    let hello = runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(container_config("hello", &image_id, &pod_image, &[program])),
            sandbox_config: Some(sandbox_config("nix-pod", logs.path())),
        })
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", nix_cri.log_tail()))
        .into_inner()
        .container_id;
    hello_id.set(hello.clone()).unwrap();
    runtime
        .start_container(cri::StartContainerRequest {
            container_id: hello.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("start: {e}\n{}", containerd.diagnostics()));
    let (direct, proxied) = (events_direct.await.unwrap(), events_proxied.await.unwrap());
    match (direct, proxied) {
        (Err(direct), Err(proxied)) => {
            assert_eq!(containerd.kind(), RuntimeKind::Containerd16, "{direct:?}");
            assert_eq!(direct.code(), proxied.code());
            assert_eq!(direct.message(), proxied.message());
        }
        (Ok(direct), Ok(proxied)) => {
            assert!(!direct.is_empty());
            assert_eq!(direct, proxied);
        }
        (direct, proxied) => panic!("the runtime said {direct:?}, nix-cri said {proxied:?}"),
    }
    assert_eq!(wait_exit(&mut runtime, &hello).await, 0);
    let log = std::fs::read_to_string(logs.path().join("hello.log")).unwrap();
    assert!(log.contains(fx.str_at("/expected_stdout").trim()), "{log}");

    // A long-running container to look inside with ExecSync.
    let busybox = fx.path("busybox");
    let sh = format!("{busybox}/bin/sh");
    let shell = runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(container_config(
                "shell",
                &image_id,
                &pod_image,
                &[&sh, "-c", "sleep 3600"],
            )),
            sandbox_config: Some(sandbox_config("nix-pod", logs.path())),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    runtime
        .start_container(cri::StartContainerRequest {
            container_id: shell.clone(),
        })
        .await
        .unwrap();
    let exec_client = runtime.clone();
    let exec = |cmd: String| {
        let mut runtime = exec_client.clone();
        let shell = shell.clone();
        let sh = sh.clone();
        async move {
            runtime
                .exec_sync(cri::ExecSyncRequest {
                    container_id: shell,
                    cmd: vec![sh, "-c".into(), cmd],
                    timeout: 10,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let symlinks = fx.path("symlinks");
    let bottom = fx.path("diamond_bottom");
    let out = exec(format!("cat {symlinks}/relative && cat {symlinks}/absolute-store && test -x {program} && echo exec-ok")).await;
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("exec-ok"));
    // A store path that is itself a symlink stays a symlink (it travels in the root layer;
    // a bind mount would have been resolved on the host) and resolves inside the closure.
    let single_symlink = fx.path("single_symlink");
    let out = exec(format!("readlink {single_symlink} && cat {single_symlink}")).await;
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{bottom}/share/bottom.txt")),
        "{stdout}"
    );
    assert!(stdout.contains("diamond bottom"), "{stdout}");
    let out = exec(format!("echo x > {bottom}/new-file")).await;
    assert_ne!(out.exit_code, 0, "the store must be read-only");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only the closure is visible: a path outside it is not there.
    let disjoint = fx.closure("disjoint");
    let out = exec(format!("test -e {disjoint}")).await;
    assert_ne!(out.exit_code, 0, "{disjoint} is not in the image's closure");
    // The whole closure arrives in one read-only mount of its view, not one mount per path.
    let out = exec("cat /proc/self/mountinfo".to_owned()).await;
    let mountinfo = String::from_utf8_lossy(&out.stdout);
    let store_mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|at| at.starts_with("/nix"))
        })
        .collect();
    assert_eq!(store_mounts.len(), 1, "{mountinfo}");
    assert_eq!(store_mounts[0].split(' ').nth(4), Some("/nix/store"));
    let view = nix_cri
        .root
        .join("nix/var/nix-cri/views")
        .join(top.trim_start_matches("/nix/store/"));
    assert!(view.join(bottom.trim_start_matches("/nix/store/")).exists());

    // An ordinary image's container in the same pod, through the same socket.
    let busybox_image = containerd.busybox_image();
    let ordinary_id = images
        .pull_image(cri::PullImageRequest {
            image: image_spec(&busybox_image),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    let ordinary = runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(container_config(
                "ordinary",
                &ordinary_id,
                &busybox_image,
                &["/bin/busybox", "echo", "ordinary-ok"],
            )),
            sandbox_config: Some(sandbox_config("nix-pod", logs.path())),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    runtime
        .start_container(cri::StartContainerRequest {
            container_id: ordinary.clone(),
        })
        .await
        .unwrap();
    assert_eq!(wait_exit(&mut runtime, &ordinary).await, 0);
    assert!(
        std::fs::read_to_string(logs.path().join("ordinary.log"))
            .unwrap()
            .contains("ordinary-ok")
    );

    // kubelet's own gRPC library, grpc-go, through nix-cri to containerd's grpc-go server:
    // forwarded answers are what containerd gives the same client directly, a 2 MB ExecSync
    // answer included (past the initial windows, with grpc-go's BDP pings). Exact bytes where
    // containerd's are stable; decoded where it writes maps in Go's random order.
    let exec_large = cri::ExecSyncRequest {
        container_id: shell.clone(),
        cmd: vec![
            sh.clone(),
            "-c".into(),
            "head -c 2000000 /dev/zero | tr '\\0' a".into(),
        ],
        timeout: 20,
    }
    .encode_to_vec();
    let of_pod = cri::ListContainersRequest {
        filter: Some(cri::ContainerFilter {
            pod_sandbox_id: sandbox.clone(),
            ..Default::default()
        }),
    }
    .encode_to_vec();
    let hello_status = cri::ContainerStatusRequest {
        container_id: hello.clone(),
        verbose: false,
    }
    .encode_to_vec();
    let kept = |call: GoCall| GoCall { keep: true, ..call };
    let calls = [
        GoCall::unary("/runtime.v1.RuntimeService/Version", b"\x0a\x02v1", 16),
        GoCall::unary("/runtime.v1.RuntimeService/ExecSync", &exec_large, 2),
        kept(GoCall::unary(
            "/runtime.v1.RuntimeService/ListContainers",
            &of_pod,
            4,
        )),
        kept(GoCall::unary(
            "/runtime.v1.RuntimeService/ContainerStatus",
            &hello_status,
            4,
        )),
    ];
    let direct = GrpcGoCaller::connect(containerd.socket())
        .round(&calls)
        .await;
    let proxied = GrpcGoCaller::connect(&nix_cri.socket).round(&calls).await;
    let answers = |call: usize| -> Vec<GoResult> {
        let all: Vec<GoResult> = direct[call].iter().chain(&proxied[call]).cloned().collect();
        assert!(
            all.iter().all(|r| r.code == 0 && r.messages.len() == 1),
            "{}: {all:?}",
            calls[call].method
        );
        all
    };
    for call in [0, 1] {
        let all = answers(call);
        assert!(
            all.iter().all(|r| *r == all[0]),
            "{}: {all:?}",
            calls[call].method
        );
    }
    let exec_answer = &direct[1][0].messages[0];
    assert!(exec_answer.len > 2_000_000, "{exec_answer:?}");
    let mut listed: Vec<cri::ListContainersResponse> = decoded(&answers(2));
    for list in &mut listed {
        list.containers.sort_by(|a, b| a.id.cmp(&b.id));
    }
    assert_eq!(listed[0].containers.len(), 3);
    assert!(listed.iter().all(|l| *l == listed[0]), "{listed:?}");
    let statuses: Vec<cri::ContainerStatusResponse> = decoded(&answers(3));
    assert!(statuses.iter().all(|s| *s == statuses[0]), "{statuses:?}");
    // And the calls nix-cri answers itself: grpc-go gets what tonic gets.
    let nix_status = cri::ImageStatusRequest {
        image: image_spec(&pod_image),
        verbose: true,
    };
    let answered = [
        kept(GoCall::unary(
            "/runtime.v1.ImageService/ImageStatus",
            &nix_status.encode_to_vec(),
            4,
        )),
        kept(GoCall::unary("/runtime.v1.ImageService/ListImages", b"", 2)),
    ];
    let results = GrpcGoCaller::connect(&nix_cri.socket)
        .round(&answered)
        .await;
    let want_status = images.image_status(nix_status).await.unwrap().into_inner();
    let got: Vec<cri::ImageStatusResponse> = decoded(&results[0]);
    assert!(got.iter().all(|s| *s == want_status), "{got:?}");
    let sorted = |mut list: cri::ListImagesResponse| {
        list.images.sort_by(|a, b| a.id.cmp(&b.id));
        list
    };
    let want_list = sorted(
        images
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    let got: Vec<cri::ListImagesResponse> = decoded(&results[1]);
    assert!(
        got.into_iter().all(|l| sorted(l) == want_list),
        "{results:?}"
    );

    // The closure is held by the image and by each container.
    let roots_dir = nix_cri.root.join("nix/var/nix/gcroots/nix-cri");
    assert!(roots_dir.join("containers").join(&hello).exists());
    // Roots name the image as `sha256:<hex>`, whichever way the runtime spells its ids.
    let root_name = format!("sha256:{}", image_id.trim_start_matches("sha256:"));
    assert!(roots_dir.join("images").join(&root_name).exists());

    // RemoveImage while containers exist: their paths stay. containerd removes the image;
    // CRI-O refuses an image in use by a container, and nix-cri passes its refusal on with the
    // image root left as it was.
    let removed = images
        .remove_image(cri::RemoveImageRequest {
            image: image_spec(&image_id),
        })
        .await;
    match containerd.kind() {
        RuntimeKind::Crio => {
            let refused = removed.unwrap_err();
            assert!(refused.message().contains("in use"), "{refused:?}");
            assert!(roots_dir.join("images").join(&root_name).exists());
        }
        RuntimeKind::Containerd2 | RuntimeKind::Containerd16 => {
            removed.unwrap();
            assert!(!roots_dir.join("images").join(&root_name).exists());
        }
    }
    assert!(
        nix_cri.root.join(bottom.trim_start_matches('/')).exists(),
        "a container still holds it"
    );
    let out = exec(format!("cat {symlinks}/relative")).await;
    assert_eq!(out.exit_code, 0);

    // Teardown as kubelet does it.
    for id in [&hello, &shell, &ordinary] {
        let _ = runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.to_string(),
                timeout: 0,
            })
            .await;
        runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .unwrap();
    }
    remove_pod(&mut runtime, &sandbox).await.unwrap();
    // Removing again is fine (idempotent). The last container's removal let the closure go.
    images
        .remove_image(cri::RemoveImageRequest {
            image: image_spec(&pod_image),
        })
        .await
        .unwrap();
    let bottom_on_disk = nix_cri.root.join(bottom.trim_start_matches('/'));
    for _ in 0..100 {
        if !bottom_on_disk.exists() && !view.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !bottom_on_disk.exists(),
        "closure collected\n{}",
        nix_cri.log_tail()
    );
    let left: Vec<_> = std::fs::read_dir(nix_cri.root.join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "store not empty: {left:?}");
    let views: Vec<_> = std::fs::read_dir(nix_cri.root.join("nix/var/nix-cri/views"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(views.is_empty(), "views left: {views:?}");
    run(nix_command("nix-store")
        .arg("--store")
        .arg(&nix_cri.root)
        .args(["--verify", "--check-contents"]))
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_images_need_the_runtime_class() {
    let fx = fixtures();
    let containerd = Containerd::start().await.expect("start containerd");
    let cache = CacheServer::start(fx.cache_dir("zstd")).await.unwrap();
    let nix_cri = NixCriServer::start(containerd.socket(), &cache.url(), &[])
        .await
        .unwrap();
    let mut images = image_client(&nix_cri.socket).await.unwrap();
    let mut runtime = runtime_client(&nix_cri.socket).await.unwrap();
    let pod_image = format!("nix:0{}", fx.closure("disjoint"));
    // kubelet pulls with grpc-go on its image-service connection, which other calls share
    // meanwhile: the pull is answered here, on a task of its own, the rest as they come.
    let pull = cri::PullImageRequest {
        image: image_spec(&pod_image),
        ..Default::default()
    };
    let results = GrpcGoCaller::connect(&nix_cri.socket)
        .round(&[
            GoCall {
                keep: true,
                ..GoCall::unary(
                    "/runtime.v1.ImageService/PullImage",
                    &pull.encode_to_vec(),
                    1,
                )
            },
            GoCall::unary("/runtime.v1.ImageService/ImageFsInfo", b"", 8),
            GoCall::unary("/runtime.v1.RuntimeService/Version", b"\x0a\x02v1", 16),
        ])
        .await;
    let pulled: Vec<cri::PullImageResponse> = decoded(&results[0]);
    let image_id = pulled[0].image_ref.clone();
    assert!(containerd.is_image_id(&image_id), "{image_id}");
    for result in results[1].iter().chain(&results[2]) {
        assert_eq!(result.code, 0, "{result:?}");
    }
    let by_reference = images
        .image_status(cri::ImageStatusRequest {
            image: image_spec(&pod_image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_reference.image.map(|i| i.id), Some(image_id.clone()));
    // A pod without the RuntimeClass, whose own annotations claim the opt-in: kubelet copies
    // pod annotations into the sandbox config, so a pod can name nix-cri's annotation itself.
    let logs = tempfile::tempdir().unwrap();
    let mut plain_pod = sandbox_config("plain-pod", logs.path());
    plain_pod
        .annotations
        .insert(SANDBOX_ANNOTATION.into(), "nix".into());
    let sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(plain_pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let refused = |what: &str, status: tonic::Status| {
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains("runtimeClassName: nix"),
            "{}",
            status.message()
        );
    };
    let create_in_plain_pod = cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.clone(),
        config: Some(container_config("c", &image_id, &pod_image, &["/x"])),
        sandbox_config: Some(plain_pod.clone()),
    };
    refused(
        "CreateContainer",
        runtime
            .create_container(create_in_plain_pod.clone())
            .await
            .unwrap_err(),
    );
    // The claim never reached the runtime, so nix-cri restarted on the same store, which asks
    // the runtime, refuses too. The rest of the test talks to the restarted one.
    let mut nix_cri = nix_cri;
    nix_cri.kill();
    let restarted =
        NixCriServer::start_with_root(containerd.socket(), &cache.url(), Some(&nix_cri.root), &[])
            .await
            .unwrap();
    let mut runtime = runtime_client(&restarted.socket).await.unwrap();
    let mut images = image_client(&restarted.socket).await.unwrap();
    refused(
        "CreateContainer after a restart",
        runtime
            .create_container(create_in_plain_pod)
            .await
            .unwrap_err(),
    );
    // kubelet's PullImage names the pod: refused before anything is fetched.
    let other_image = format!("nix:0{}", fx.closure("overlap"));
    refused(
        "PullImage",
        images
            .pull_image(cri::PullImageRequest {
                image: image_spec(&other_image),
                sandbox_config: Some(plain_pod.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    let overlap_top = nix_cri
        .root
        .join(fx.closure("overlap").trim_start_matches('/'));
    assert!(!overlap_top.exists(), "nothing fetched for a refused pull");
    // A pod that opted in pulls with its config.
    let nix_pod = sandbox_config("nix-pod", logs.path());
    let nix_sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(nix_pod.clone()),
            runtime_handler: "nix".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    images
        .pull_image(cri::PullImageRequest {
            image: image_spec(&other_image),
            sandbox_config: Some(nix_pod),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("pull for an opted-in pod: {e}\n{}", restarted.log_tail()));
    assert!(overlap_top.exists());
    remove_pod(&mut runtime, &nix_sandbox).await.unwrap();

    // The Status call reports the nix handler.
    let status = runtime
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(status.runtime_handlers.iter().any(|h| h.name == "nix"));
    remove_pod(&mut runtime, &sandbox).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn container_roots_are_reconciled_after_a_crash() {
    let fx = fixtures();
    let containerd = Containerd::start().await.expect("start containerd");
    let cache = CacheServer::start(fx.cache_dir("none")).await.unwrap();
    let store_root = tempfile::tempdir().unwrap();
    let mut first = NixCriServer::start_with_root(
        containerd.socket(),
        &cache.url(),
        Some(store_root.path()),
        &[],
    )
    .await
    .unwrap();
    let mut images = image_client(&first.socket).await.unwrap();
    let mut runtime = runtime_client(&first.socket).await.unwrap();
    // The closure with a program in it: CRI-O runs `runc create` at CreateContainer already, so
    // the command must exist (containerd only looks at StartContainer).
    let pod_image = format!("nix:0{}", fx.closure("main"));
    let program = fx.str_at("/executable_bin").to_owned();
    let image_id = images
        .pull_image(cri::PullImageRequest {
            image: image_spec(&pod_image),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    let logs = tempfile::tempdir().unwrap();
    let sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config("crash-pod", logs.path())),
            runtime_handler: "nix".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let create = |name: &'static str| {
        let mut runtime = runtime.clone();
        let sandbox = sandbox.clone();
        let image_id = image_id.clone();
        let pod_image = pod_image.clone();
        let program = program.clone();
        let logs = logs.path().to_owned();
        async move {
            runtime
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox,
                    config: Some(container_config(name, &image_id, &pod_image, &[&program])),
                    sandbox_config: Some(sandbox_config("crash-pod", &logs)),
                })
                .await
                .unwrap()
                .into_inner()
                .container_id
        }
    };
    let removed_behind_our_back = create("a").await;
    let root_lost_in_a_crash = create("b").await;
    let roots = store_root
        .path()
        .join("nix/var/nix/gcroots/nix-cri/containers");
    assert!(
        roots.join(&removed_behind_our_back).exists() && roots.join(&root_lost_in_a_crash).exists()
    );

    // nix-cri dies; meanwhile one container is removed directly in containerd, and the other
    // container's root is lost (a crash between CreateContainer and its root).
    first.kill();
    runtime_client(containerd.socket())
        .await
        .unwrap()
        .remove_container(cri::RemoveContainerRequest {
            container_id: removed_behind_our_back.clone(),
        })
        .await
        .unwrap();
    std::fs::remove_file(roots.join(&root_lost_in_a_crash)).unwrap();

    // Restarted on the same store, nix-cri reconciles with containerd's containers.
    let second = NixCriServer::start_with_root(
        containerd.socket(),
        &cache.url(),
        Some(store_root.path()),
        &[],
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while roots.join(&removed_behind_our_back).exists()
        || !roots.join(&root_lost_in_a_crash).exists()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not reconciled:\n{}",
            second.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut runtime = runtime_client(&second.socket).await.unwrap();
    runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: root_lost_in_a_crash,
        })
        .await
        .unwrap();
    remove_pod(&mut runtime, &sandbox).await.unwrap();
}
