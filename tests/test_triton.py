"""Serving from a real tritonserver (the serve extra's, nvidia-pytriton's) with real clients: the
repository ``srexport triton`` writes, HTTP and gRPC answers byte for byte equal to ``srexport
run``, concurrent clients whose tiles share batches, and bad requests that leave it serving."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'srexport[serve]'")
http = pytest.importorskip("tritonclient.http", reason="needs the serve extra: pip install 'srexport[serve]'")
grpc = pytest.importorskip("tritonclient.grpc", reason="needs the serve extra: pip install 'srexport[serve]'")

from srexport.cli import main  # noqa: E402
from srexport.runtime.images import load_image, save_image  # noqa: E402
from srexport.runtime.regions import to_uint8_hwc  # noqa: E402
from srexport.serving.launcher import free_ports  # noqa: E402

# small tiles, so a 48x40 LR image (192x160 output) tiles and a 32x32 one (128x128) runs whole
TILING = dict(tile=128, overlap=32, batch=2, vae_tile=128, vae_overlap=32, vae_norm="per-tile", unet_norm="per-tile")


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8).numpy()


class Served:
    def __init__(self, artifact, repo, server):
        self.artifact, self.repo, self.server = artifact, repo, server
        self.http_url = f"127.0.0.1:{server.ports['http']}"
        self.http = http.InferenceServerClient(self.http_url)  # for the test's own thread
        self.grpc_url = f"127.0.0.1:{server.ports['grpc']}"

    def infer(self, image=None, protocol="http", data=None, **controls):
        client = http if protocol == "http" else grpc
        inputs = []

        def add(name, array, dtype):
            tensor = client.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)

        if image is not None:
            add("IMAGE", image, "UINT8")
        if data is not None:
            add("IMAGE_BYTES", np.array([data], dtype=np.object_), "BYTES")
        for name, value in controls.items():
            if name in ("GUIDANCE", "COLOR_FIX"):
                add(name, np.array([value.encode()], dtype=np.object_), "BYTES")
            else:
                add(name, np.atleast_1d(np.asarray(value, dtype=np.float32)), "FP32")
        # a client per call: tritonclient's HTTP client (gevent) must not be shared between threads
        url = self.http_url if protocol == "http" else self.grpc_url
        with client.InferenceServerClient(url) as connection:
            return connection.infer("srexport", inputs).as_numpy("IMAGE")

    def ready(self) -> bool:
        return self.http.is_server_ready()

    def close(self) -> None:
        self.http.close()  # an open connection would hold the server's shutdown


def _serve(artifact, repo_args, tmp_path_factory):
    from srexport.serving.launcher import TritonServer

    repo = tmp_path_factory.mktemp("repo") / "repository"
    assert main(["triton", str(artifact), "--out", str(repo), "--threads", "1", *repo_args]) == 0
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    return TritonServer(repo, "127.0.0.1", *free_ports(3), log_file=log), repo


@pytest.fixture(scope="module")
def pisa_served(adjustable_artifact, retile, tmp_path_factory):
    """The adjustable demo (per-call scales), retiled small, 2 orchestrator instances; its decoder
    model configured to raise on latents 5 wide, a width the pipeline never sends (a component
    that fails)."""
    import srexport.serving.repository as repository

    artifact = retile(adjustable_artifact, **TILING)
    repo = tmp_path_factory.mktemp("repo") / "repository"
    repository.write_repository(artifact, repo, instances=2, threads=1, max_output_megapixels=0.5,
                                fail_on_width={"vae_decoder": 5})
    from srexport.serving.launcher import TritonServer

    server = TritonServer(repo, "127.0.0.1", *free_ports(3), log_file=tmp_path_factory.mktemp("log") / "t.log")
    with server:
        served = Served(artifact, repo, server)
        yield served
        served.close()


@pytest.fixture(scope="module")
def s3diff_served(s3diff_artifact, retile, tmp_path_factory):
    artifact = retile(s3diff_artifact[0].folder, **TILING)
    server, repo = _serve(artifact, [], tmp_path_factory)
    with server:
        served = Served(artifact, repo, server)
        yield served
        served.close()


@contextlib.contextmanager
def _as_a_process_runs():
    """torch's thread count of a fresh process (the server's, ``srexport run``'s): a worker of the
    parallel suite runs with fewer, and the colour fix's reductions round by the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(artifact, image: np.ndarray, tmp_path, flags=()) -> np.ndarray:
    """What ``srexport run`` writes for this image, as HxWx3 uint8."""
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    save_image(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, src)
    # one onnxruntime thread, as the repository's component models run (--threads 1)
    with _as_a_process_runs():
        assert main(["run", str(artifact), str(src), "-o", str(out), "--force", "--threads", "1", *flags]) == 0
    return to_uint8_hwc(load_image(out))


def test_repository_configs_come_from_the_specs(pisa_served):
    from srexport.artifact.manifest import load_artifact

    specs = load_artifact(pisa_served.artifact).components
    config = pisa_served.http.get_model_config("unet")
    assert [i["name"] for i in config["input"]] == specs["unet"].input_names == ["latent", "lora_scales"]
    assert config["max_batch_size"] == 2 * 2 * 2  # tile batch x exact's two samples x 2 orchestrators
    assert "dynamic_batching" in config
    assert pisa_served.http.get_model_config("srexport")["instance_group"][0]["count"] == 2
    readme = (pisa_served.repo / "README.md").read_text()
    assert "srexport serve REPO" in readme and str(pisa_served.artifact) in readme


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("size", [(32, 32), (40, 48)], ids=["untiled", "tiled"])
def test_answers_equal_srexport_run_byte_for_byte(pisa_served, s3diff_served, protocol, size, tmp_path):
    from srexport.runtime.loading import load_pipeline

    image = _image(1, *size)
    tiled = load_pipeline(pisa_served.artifact).will_tile(*size)
    assert tiled == (size == (40, 48))
    for served in (pisa_served, s3diff_served):
        assert np.array_equal(served.infer(image, protocol), _run(served.artifact, image, tmp_path))
    flags = ["--lambda-pix", "0.8", "--lambda-sem", "0.5", "--guidance", "exact"]
    answer = pisa_served.infer(image, protocol, LAMBDA_PIX=0.8, LAMBDA_SEM=0.5, GUIDANCE="exact")
    assert np.array_equal(answer, _run(pisa_served.artifact, image, tmp_path, flags))
    answer = s3diff_served.infer(image, protocol, CFG_SCALE=1.2, DEGRADATION=[0.3, 0.1])
    assert np.array_equal(answer, _run(s3diff_served.artifact, image, tmp_path,
                                       ["--cfg-scale", "1.2", "--degradation", "0.3,0.1"]))


def test_encoded_bytes_and_exif_orientation(pisa_served, tmp_path):
    """IMAGE_BYTES takes an encoded file; an EXIF-rotated photo is turned upright first, here and
    in srexport run."""
    from PIL import Image

    image = _image(2, 32, 40)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(image).save(path, quality=95, exif=exif)
    answer = pisa_served.infer(data=path.read_bytes())
    assert answer.shape == (4 * 40, 4 * 32, 3)  # upright: width and height swapped
    out = tmp_path / "run.png"
    with _as_a_process_runs():
        assert main(["run", str(pisa_served.artifact), str(path), "-o", str(out), "--threads", "1"]) == 0
    assert np.array_equal(answer, to_uint8_hwc(load_image(out)))


def test_concurrent_clients_each_get_their_own_answer_and_share_batches(pisa_served):
    """8 clients x 4 requests of different sizes and scales, at once: every answer equals its own
    run; the UNet model's statistics show batches larger than one call's."""
    from srexport.runtime.loading import load_pipeline

    jobs = [(c, r, _image(10 * c + r, 32 + 8 * (r % 2), 32 + 8 * (c % 3)), 0.6 + 0.1 * r, 0.3 * c % 1.5)
            for c in range(8) for r in range(4)]

    def client(c):
        return [(job, pisa_served.infer(job[2], "http" if c % 2 else "grpc", LAMBDA_PIX=job[3], LAMBDA_SEM=job[4]))
                for job in jobs if job[0] == c]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [a for result in pool.map(client, range(8)) for a in result]
    pipeline = load_pipeline(pisa_served.artifact, threads=1)
    with _as_a_process_runs():
        expected = [to_uint8_hwc(pipeline(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
                                          lambda_pix=float(str(np.float32(lp))), lambda_sem=float(str(np.float32(ls)))))
                    for (c, r, image, lp, ls), _ in answers]  # a float32 scale is read as its shortest decimal
    for ((c, r, *_), answer), want in zip(answers, expected):
        assert np.array_equal(answer, want), (c, r)
    port = pisa_served.server.ports["http"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/unet/stats") as response:
        stats = json.loads(response.read())["model_stats"][0]
    sizes = {b["batch_size"] for b in stats["batch_stats"]}
    assert max(sizes) > 2, sizes  # calls of two orchestrators (2 tiles each) merged by the batcher


@pytest.mark.parametrize("request_kwargs,message", [
    (dict(image=np.zeros((40, 40, 3), np.float32)), "data-type is 'FP32', but model 'srexport' expects 'UINT8'"),
    (dict(image=np.zeros((40, 40), np.uint8)), "unexpected shape"),
    (dict(data=b"not an image"), "not an image Pillow can read"),
    (dict(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "IMAGE_BYTES"),
    (dict(image=np.zeros((1, 1, 3), np.uint8)), "at least 2 pixels"),
    (dict(image=np.zeros((200, 200, 3), np.uint8)), "over this server's limit of 0.5 MP"),
    (dict(image=np.zeros((32, 32, 3), np.uint8), LAMBDA_PIX=float("nan")), "not finite"),
    (dict(image=np.zeros((32, 32, 3), np.uint8), CFG_SCALE=1.2), "does not apply to a pisa-sr artifact"),
    (dict(image=np.zeros((32, 32, 3), np.uint8), GUIDANCE="both"), "is not one of merged, exact"),
    (dict(), "send exactly one of IMAGE"),
])
def test_bad_requests_get_one_line_and_the_server_keeps_serving(pisa_served, request_kwargs, message):
    from tritonclient.utils import InferenceServerException

    kwargs = dict(request_kwargs)
    image = kwargs.pop("image", None)
    if image is not None and image.dtype != np.uint8:  # a wrong dtype, sent as such
        tensor = http.InferInput("IMAGE", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        with pytest.raises(InferenceServerException, match=message):
            pisa_served.http.infer("srexport", [tensor])
    else:
        with pytest.raises(InferenceServerException, match=message) as error:
            pisa_served.infer(image, **kwargs)
        assert "\n" not in str(error.value.message())
    assert pisa_served.ready()
    assert pisa_served.infer(_image(3, 32, 32)).shape == (128, 128, 3)


def test_a_component_that_raises_does_not_take_the_server_down(pisa_served):
    from tritonclient.utils import InferenceServerException

    latent = http.InferInput("denoised", [1, 4, 16, 5], "FP32")
    latent.set_data_from_numpy(np.zeros((1, 4, 16, 5), np.float32))
    with pytest.raises(InferenceServerException, match="configured to fail"):
        pisa_served.http.infer("vae_decoder", [latent])
    assert pisa_served.ready()
    assert pisa_served.infer(_image(4, 40, 48)).shape == (160, 192, 3)


def test_cli_refusals(adjustable_artifact, tmp_path, capsys):
    for argv, message in [
        (["triton", str(adjustable_artifact), "--out", str(adjustable_artifact / "repo")], "overlaps the artifact"),
        (["triton", str(adjustable_artifact), "--out", str(tmp_path / "r"), "--max-batch-size", "1"],
         "below the"),
        (["triton", str(adjustable_artifact), "--out", str(tmp_path / "r"), "--components", "native",
          "--backend", "trt"], "no TensorRT engines"),
        (["serve", str(tmp_path)], "not a repository written by 'srexport triton'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_client_example_and_serve_with_ctrl_c(pisa_served, tmp_path):
    """examples/triton_client.py against the server; then ``srexport serve`` as a user starts it:
    it prints the endpoints once ready, and Ctrl-C stops the server and exits 0."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from srexport.runtime.images import save_image

    example = Path(__file__).resolve().parents[1] / "examples" / "triton_client.py"
    photo, out = tmp_path / "lr.png", tmp_path / "sr.png"
    save_image(torch.from_numpy(_image(5, 32, 40)).permute(2, 0, 1)[None].float() / 255, photo)
    for protocol, port in (("--http", "http"), ("--grpc", "grpc")):
        flags = ["--grpc"] if protocol == "--grpc" else []
        done = subprocess.run([sys.executable, str(example), str(photo), "-o", str(out), "--url",
                               f"127.0.0.1:{pisa_served.server.ports[port]}", "--lambda-pix", "0.8", *flags],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert np.array_equal(to_uint8_hwc(load_image(out)), pisa_served.infer(_image(5, 32, 40), LAMBDA_PIX=0.8))
    ports = free_ports(3)
    serve = subprocess.Popen([sys.executable, "-m", "srexport.cli", "serve", str(pisa_served.repo),
                              "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                              "--metrics-port", str(ports[2])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        first = serve.stdout.readline()  # printed once the server is ready
        assert first.startswith("http") and f"127.0.0.1:{ports[0]}" in first
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=90) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    try:  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5)
        gone = False
    except OSError:
        gone = True
    assert gone


def test_a_native_repository_holds_the_graphs_for_tritons_own_backends(demo_artifact, tmp_path):
    """--components native: onnxruntime_onnx models with copies of the graphs (not run here: the
    serve extra's tritonserver has only the Python backend)."""
    from srexport.artifact.manifest import ORT_GRAPH, load_artifact, sha256_of
    from srexport.serving.repository import write_repository

    repo = write_repository(demo_artifact, tmp_path / "native", backend="ort-cuda", components="native")
    artifact = load_artifact(demo_artifact)
    for name, spec in artifact.components.items():
        config = (repo / name / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in config and "KIND_GPU" in config
        assert all(f'name: "{t}"' in config for t in spec.input_names + spec.output_names)
        # onnxruntime's backend gets the attention-fused twin
        assert sha256_of(repo / name / "1" / "model.onnx") == sha256_of(artifact.component_file(name, ORT_GRAPH))
    assert 'backend: "python"' in (repo / "srexport" / "config.pbtxt").read_text()
