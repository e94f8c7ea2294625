"""The `auto_map` entry of a registered object, as `transformers.dynamic_module_utils.custom_object_save` writes it."""

from typing import Any, Dict


def auto_map_entry(obj: Any) -> Dict[str, str]:
    """{auto class: "<module file>.<class>"} for an object whose class called `register_for_auto_class`.

    `save_pretrained` copies each registered class's module next to the saved files (flattened), so the reference is
    the module's last name; the class's own entry is recomputed here instead of read from attributes that saving
    mutates, so that `to_dict()` is the same before and after a save / load round trip.
    """
    cls = type(obj)
    return {cls._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"}
