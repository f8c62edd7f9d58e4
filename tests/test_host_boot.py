from conftest import HOST


def test_pack_loaded_through_comfy_loader():
    import nodes

    assert HOST.pack.NODE_CLASS_MAPPINGS is not None
    for node_id in HOST.pack.NODE_CLASS_MAPPINGS:
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is HOST.pack.NODE_CLASS_MAPPINGS[node_id]


def test_everything_the_host_writes_goes_to_the_temp_folder():
    """CI mounts ComfyUI 0.3.64 read-only: output, input, temp and (0.3.x) user folders must live in the harness's
    temporary folder, never in the host tree."""
    import os

    import folder_paths

    dirs = [folder_paths.get_output_directory(), folder_paths.get_input_directory(), folder_paths.get_temp_directory()]
    if HOST.is_new:
        dirs.append(folder_paths.get_user_directory())
    for path in dirs:
        assert os.path.commonpath([path, HOST.temp_dir]) == HOST.temp_dir, path
        assert os.path.commonpath([path, HOST.comfy_path]) != HOST.comfy_path, path


def test_only_newer_host_tests_may_skip_and_only_on_the_old_host():
    from conftest import skip_allowed

    assert skip_allowed(needs_newer_host=True, host_is_new=False)
    assert not skip_allowed(needs_newer_host=True, host_is_new=True)
    assert not skip_allowed(needs_newer_host=False, host_is_new=False)
    assert not skip_allowed(needs_newer_host=False, host_is_new=True)


def test_a_test_process_leaves_nothing_in_the_temp_folder():
    """The host's folders and the tiny models' config files live in per-process folders removed at exit."""
    import os
    import subprocess
    import sys
    import tempfile

    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import comfy_host, tiny_models, tiny_families; "
                "host = comfy_host.boot(); tiny_models.make_bundle(0); tiny_models.register_tiny_sam(); "
                "assert sorted(__import__('os').listdir(sys.argv[2])), 'nothing was written'")
        env = {**os.environ, "TMPDIR": tmp}
        subprocess.run([sys.executable, "-c", code, tools, tmp], check=True, env=env, capture_output=True)
        assert os.listdir(tmp) == []
