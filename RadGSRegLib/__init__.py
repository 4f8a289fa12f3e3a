"""RadGSRegLib: spine CT to biplanar X-ray registration (backend of the RadGSReg Slicer module).

Modules, one concept each: :mod:`geometry` (C-arm views, rigid transforms), :mod:`io`
(case folders, images, transforms), :mod:`drr` (digitally reconstructed radiographs),
:mod:`simulate` (realistic X-ray formation), :mod:`phantom` (procedural spine CTs),
:mod:`cases` (registration-case generator), :mod:`cli` (the ``radgsreg`` command).
"""
__version__ = "0.1.0"
