"""Hardware detection, runtime selection and one backend per runtime."""
