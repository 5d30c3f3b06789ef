;; OUT-filter: one sink per event, in turn (the sink count is the u32 at buffer + 4).
(module
  (memory (export "memory") 2)
  (global $turn (mut i32) (i32.const 0))
  (func (export "kecho_buffer") (result i32) (i32.const 1024))
  (func (export "kecho_select") (param $len i32) (result i32)
    (local $n i32)
    (local.set $n (i32.load (i32.const 1028)))
    (if (i32.eqz (local.get $n)) (then (return (i32.const 0))))
    (i32.store (i32.const 1024) (i32.rem_u (global.get $turn) (local.get $n)))
    (global.set $turn (i32.add (global.get $turn) (i32.const 1)))
    (i32.const 1)))
