"""The top-k kernels: selection (`select`), the block grid they walk (`grid`), the forward (`forward`),
the backward (`backward`, its printed index arithmetic in `backward_text`). One home for top-k in codegen;
its semantics and float64 reference are maskdsl.harness.topk, its normal form maskdsl.spec.topk_form, its
cost the simulator's `selection`."""
