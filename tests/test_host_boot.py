from conftest import HOST


def test_pack_loaded_through_comfy_loader():
    import nodes

    assert HOST.pack.NODE_CLASS_MAPPINGS is not None
    for node_id in HOST.pack.NODE_CLASS_MAPPINGS:
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is HOST.pack.NODE_CLASS_MAPPINGS[node_id]
