"""Hardware detection, runtime selection and one backend per runtime.

- hardware: what the machine offers (HardwareInfo, detect); the seam tests fake.
- selection: which runtime and device serve a model, with fallback and warm-up.
- registry: preference names -> backends; a backend that fails to import is reported.
- onnxruntime_cpu, onnxruntime_cuda, openvino_backend: one module per runtime.
- base, datatypes: the Session interface and OIP datatype conversions they share.

Importing this package imports no runtime library; the backends do, on first use.
"""
