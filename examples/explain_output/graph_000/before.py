class GraphModule(torch.nn.Module):
    def forward(self, L_idx_: "i64[1, 2048]", L_self_modules_tok_emb_parameters_weight_: "f32[256, 96]", L_self_modules_pos_emb_parameters_weight_: "f32[4096, 96]", L_self_modules_blocks_modules_0_modules_ln_1_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_0_modules_ln_1_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_weight_: "f32[288, 96]", L_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_bias_: "f32[288]", L_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_weight_: "f32[96, 96]", L_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_0_modules_ln_2_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_0_modules_ln_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_: "f32[384, 96]", L_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_: "f32[384]", L_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_: "f32[96, 384]", L_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_1_modules_ln_1_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_1_modules_ln_1_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_weight_: "f32[288, 96]", L_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_bias_: "f32[288]", L_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_weight_: "f32[96, 96]", L_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_1_modules_ln_2_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_1_modules_ln_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_weight_: "f32[384, 96]", L_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_bias_: "f32[384]", L_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_weight_: "f32[96, 384]", L_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_2_modules_ln_1_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_2_modules_ln_1_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_weight_: "f32[288, 96]", L_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_bias_: "f32[288]", L_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_weight_: "f32[96, 96]", L_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_2_modules_ln_2_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_2_modules_ln_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_weight_: "f32[384, 96]", L_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_bias_: "f32[384]", L_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_weight_: "f32[96, 384]", L_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_3_modules_ln_1_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_3_modules_ln_1_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_weight_: "f32[288, 96]", L_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_bias_: "f32[288]", L_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_weight_: "f32[96, 96]", L_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_3_modules_ln_2_parameters_weight_: "f32[96]", L_self_modules_blocks_modules_3_modules_ln_2_parameters_bias_: "f32[96]", L_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_weight_: "f32[384, 96]", L_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_bias_: "f32[384]", L_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_weight_: "f32[96, 384]", L_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_bias_: "f32[96]", L_self_modules_ln_f_parameters_weight_: "f32[96]", L_self_modules_ln_f_parameters_bias_: "f32[96]", L_self_modules_lm_head_parameters_weight_: "f32[256, 96]"):
        l_idx_ = L_idx_
        l_self_modules_tok_emb_parameters_weight_ = L_self_modules_tok_emb_parameters_weight_
        l_self_modules_pos_emb_parameters_weight_ = L_self_modules_pos_emb_parameters_weight_
        l_self_modules_blocks_modules_0_modules_ln_1_parameters_weight_ = L_self_modules_blocks_modules_0_modules_ln_1_parameters_weight_
        l_self_modules_blocks_modules_0_modules_ln_1_parameters_bias_ = L_self_modules_blocks_modules_0_modules_ln_1_parameters_bias_
        l_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_weight_ = L_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_weight_
        l_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_bias_ = L_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_bias_
        l_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_weight_ = L_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_weight_
        l_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_bias_ = L_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_bias_
        l_self_modules_blocks_modules_0_modules_ln_2_parameters_weight_ = L_self_modules_blocks_modules_0_modules_ln_2_parameters_weight_
        l_self_modules_blocks_modules_0_modules_ln_2_parameters_bias_ = L_self_modules_blocks_modules_0_modules_ln_2_parameters_bias_
        l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_ = L_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_
        l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_ = L_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_
        l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_ = L_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_
        l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_ = L_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_
        l_self_modules_blocks_modules_1_modules_ln_1_parameters_weight_ = L_self_modules_blocks_modules_1_modules_ln_1_parameters_weight_
        l_self_modules_blocks_modules_1_modules_ln_1_parameters_bias_ = L_self_modules_blocks_modules_1_modules_ln_1_parameters_bias_
        l_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_weight_ = L_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_weight_
        l_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_bias_ = L_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_bias_
        l_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_weight_ = L_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_weight_
        l_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_bias_ = L_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_bias_
        l_self_modules_blocks_modules_1_modules_ln_2_parameters_weight_ = L_self_modules_blocks_modules_1_modules_ln_2_parameters_weight_
        l_self_modules_blocks_modules_1_modules_ln_2_parameters_bias_ = L_self_modules_blocks_modules_1_modules_ln_2_parameters_bias_
        l_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_weight_ = L_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_weight_
        l_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_bias_ = L_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_bias_
        l_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_weight_ = L_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_weight_
        l_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_bias_ = L_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_bias_
        l_self_modules_blocks_modules_2_modules_ln_1_parameters_weight_ = L_self_modules_blocks_modules_2_modules_ln_1_parameters_weight_
        l_self_modules_blocks_modules_2_modules_ln_1_parameters_bias_ = L_self_modules_blocks_modules_2_modules_ln_1_parameters_bias_
        l_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_weight_ = L_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_weight_
        l_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_bias_ = L_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_bias_
        l_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_weight_ = L_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_weight_
        l_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_bias_ = L_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_bias_
        l_self_modules_blocks_modules_2_modules_ln_2_parameters_weight_ = L_self_modules_blocks_modules_2_modules_ln_2_parameters_weight_
        l_self_modules_blocks_modules_2_modules_ln_2_parameters_bias_ = L_self_modules_blocks_modules_2_modules_ln_2_parameters_bias_
        l_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_weight_ = L_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_weight_
        l_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_bias_ = L_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_bias_
        l_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_weight_ = L_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_weight_
        l_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_bias_ = L_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_bias_
        l_self_modules_blocks_modules_3_modules_ln_1_parameters_weight_ = L_self_modules_blocks_modules_3_modules_ln_1_parameters_weight_
        l_self_modules_blocks_modules_3_modules_ln_1_parameters_bias_ = L_self_modules_blocks_modules_3_modules_ln_1_parameters_bias_
        l_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_weight_ = L_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_weight_
        l_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_bias_ = L_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_bias_
        l_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_weight_ = L_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_weight_
        l_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_bias_ = L_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_bias_
        l_self_modules_blocks_modules_3_modules_ln_2_parameters_weight_ = L_self_modules_blocks_modules_3_modules_ln_2_parameters_weight_
        l_self_modules_blocks_modules_3_modules_ln_2_parameters_bias_ = L_self_modules_blocks_modules_3_modules_ln_2_parameters_bias_
        l_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_weight_ = L_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_weight_
        l_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_bias_ = L_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_bias_
        l_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_weight_ = L_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_weight_
        l_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_bias_ = L_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_bias_
        l_self_modules_ln_f_parameters_weight_ = L_self_modules_ln_f_parameters_weight_
        l_self_modules_ln_f_parameters_bias_ = L_self_modules_ln_f_parameters_bias_
        l_self_modules_lm_head_parameters_weight_ = L_self_modules_lm_head_parameters_weight_

        # File: /work/main/examples/gpt_example.py:78 in forward, code: pos = torch.arange(T, device=idx.device)
        pos: "i64[2048]" = torch.arange(2048, device = device(type='cpu'))

        # File: /work/main/examples/gpt_example.py:79 in forward, code: x = self.tok_emb(idx) + self.pos_emb(pos)
        embedding: "f32[1, 2048, 96]" = torch.nn.functional.embedding(l_idx_, l_self_modules_tok_emb_parameters_weight_, None, None, 2.0, False, False);  l_idx_ = l_self_modules_tok_emb_parameters_weight_ = None
        embedding_1: "f32[2048, 96]" = torch.nn.functional.embedding(pos, l_self_modules_pos_emb_parameters_weight_, None, None, 2.0, False, False);  pos = l_self_modules_pos_emb_parameters_weight_ = None
        x: "f32[1, 2048, 96]" = embedding + embedding_1;  embedding = embedding_1 = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        layer_norm: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x, (96,), l_self_modules_blocks_modules_0_modules_ln_1_parameters_weight_, l_self_modules_blocks_modules_0_modules_ln_1_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_0_modules_ln_1_parameters_weight_ = l_self_modules_blocks_modules_0_modules_ln_1_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:42 in forward, code: qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        linear: "f32[1, 2048, 288]" = torch._C._nn.linear(layer_norm, l_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_weight_, l_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_bias_);  layer_norm = l_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_weight_ = l_self_modules_blocks_modules_0_modules_attn_modules_qkv_parameters_bias_ = None
        qkv: "f32[1, 2048, 3, 6, 16]" = linear.view(1, 2048, 3, 6, 16);  linear = None

        # File: /work/main/examples/gpt_example.py:43 in forward, code: q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        permute: "f32[3, 1, 6, 2048, 16]" = qkv.permute(2, 0, 3, 1, 4);  qkv = None
        q: "f32[1, 6, 2048, 16]" = permute[0]
        k: "f32[1, 6, 2048, 16]" = permute[1]
        v: "f32[1, 6, 2048, 16]" = permute[2];  permute = None

        # File: /work/main/examples/gpt_example.py:45 in forward, code: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y: "f32[1, 6, 2048, 16]" = torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal = True);  q = k = v = None

        # File: /work/main/examples/gpt_example.py:48 in forward, code: return self.proj(y.transpose(1, 2).reshape(B, T, C))
        transpose: "f32[1, 2048, 6, 16]" = y.transpose(1, 2);  y = None
        reshape: "f32[1, 2048, 96]" = transpose.reshape(1, 2048, 96);  transpose = None
        linear_1: "f32[1, 2048, 96]" = torch._C._nn.linear(reshape, l_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_weight_, l_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_bias_);  reshape = l_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_weight_ = l_self_modules_blocks_modules_0_modules_attn_modules_proj_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        x_1: "f32[1, 2048, 96]" = x + linear_1;  x = linear_1 = None

        # File: /work/main/examples/gpt_example.py:63 in forward, code: return x + self.mlp(self.ln_2(x))
        layer_norm_1: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_1, (96,), l_self_modules_blocks_modules_0_modules_ln_2_parameters_weight_, l_self_modules_blocks_modules_0_modules_ln_2_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_0_modules_ln_2_parameters_weight_ = l_self_modules_blocks_modules_0_modules_ln_2_parameters_bias_ = None
        input_1: "f32[1, 2048, 384]" = torch._C._nn.linear(layer_norm_1, l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_, l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_);  layer_norm_1 = l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_ = l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_ = None
        input_2: "f32[1, 2048, 384]" = torch._C._nn.gelu(input_1, approximate = 'none');  input_1 = None
        input_3: "f32[1, 2048, 96]" = torch._C._nn.linear(input_2, l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_, l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_);  input_2 = l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_ = l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_ = None
        x_2: "f32[1, 2048, 96]" = x_1 + input_3;  x_1 = input_3 = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        layer_norm_2: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_2, (96,), l_self_modules_blocks_modules_1_modules_ln_1_parameters_weight_, l_self_modules_blocks_modules_1_modules_ln_1_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_1_modules_ln_1_parameters_weight_ = l_self_modules_blocks_modules_1_modules_ln_1_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:42 in forward, code: qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        linear_4: "f32[1, 2048, 288]" = torch._C._nn.linear(layer_norm_2, l_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_weight_, l_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_bias_);  layer_norm_2 = l_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_weight_ = l_self_modules_blocks_modules_1_modules_attn_modules_qkv_parameters_bias_ = None
        qkv_1: "f32[1, 2048, 3, 6, 16]" = linear_4.view(1, 2048, 3, 6, 16);  linear_4 = None

        # File: /work/main/examples/gpt_example.py:43 in forward, code: q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        permute_1: "f32[3, 1, 6, 2048, 16]" = qkv_1.permute(2, 0, 3, 1, 4);  qkv_1 = None
        q_1: "f32[1, 6, 2048, 16]" = permute_1[0]
        k_1: "f32[1, 6, 2048, 16]" = permute_1[1]
        v_1: "f32[1, 6, 2048, 16]" = permute_1[2];  permute_1 = None

        # File: /work/main/examples/gpt_example.py:45 in forward, code: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y_1: "f32[1, 6, 2048, 16]" = torch._C._nn.scaled_dot_product_attention(q_1, k_1, v_1, is_causal = True);  q_1 = k_1 = v_1 = None

        # File: /work/main/examples/gpt_example.py:48 in forward, code: return self.proj(y.transpose(1, 2).reshape(B, T, C))
        transpose_1: "f32[1, 2048, 6, 16]" = y_1.transpose(1, 2);  y_1 = None
        reshape_1: "f32[1, 2048, 96]" = transpose_1.reshape(1, 2048, 96);  transpose_1 = None
        linear_5: "f32[1, 2048, 96]" = torch._C._nn.linear(reshape_1, l_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_weight_, l_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_bias_);  reshape_1 = l_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_weight_ = l_self_modules_blocks_modules_1_modules_attn_modules_proj_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        x_3: "f32[1, 2048, 96]" = x_2 + linear_5;  x_2 = linear_5 = None

        # File: /work/main/examples/gpt_example.py:63 in forward, code: return x + self.mlp(self.ln_2(x))
        layer_norm_3: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_3, (96,), l_self_modules_blocks_modules_1_modules_ln_2_parameters_weight_, l_self_modules_blocks_modules_1_modules_ln_2_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_1_modules_ln_2_parameters_weight_ = l_self_modules_blocks_modules_1_modules_ln_2_parameters_bias_ = None
        input_4: "f32[1, 2048, 384]" = torch._C._nn.linear(layer_norm_3, l_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_weight_, l_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_bias_);  layer_norm_3 = l_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_weight_ = l_self_modules_blocks_modules_1_modules_mlp_modules_0_parameters_bias_ = None
        input_5: "f32[1, 2048, 384]" = torch._C._nn.gelu(input_4, approximate = 'none');  input_4 = None
        input_6: "f32[1, 2048, 96]" = torch._C._nn.linear(input_5, l_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_weight_, l_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_bias_);  input_5 = l_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_weight_ = l_self_modules_blocks_modules_1_modules_mlp_modules_2_parameters_bias_ = None
        x_4: "f32[1, 2048, 96]" = x_3 + input_6;  x_3 = input_6 = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        layer_norm_4: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_4, (96,), l_self_modules_blocks_modules_2_modules_ln_1_parameters_weight_, l_self_modules_blocks_modules_2_modules_ln_1_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_2_modules_ln_1_parameters_weight_ = l_self_modules_blocks_modules_2_modules_ln_1_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:42 in forward, code: qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        linear_8: "f32[1, 2048, 288]" = torch._C._nn.linear(layer_norm_4, l_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_weight_, l_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_bias_);  layer_norm_4 = l_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_weight_ = l_self_modules_blocks_modules_2_modules_attn_modules_qkv_parameters_bias_ = None
        qkv_2: "f32[1, 2048, 3, 6, 16]" = linear_8.view(1, 2048, 3, 6, 16);  linear_8 = None

        # File: /work/main/examples/gpt_example.py:43 in forward, code: q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        permute_2: "f32[3, 1, 6, 2048, 16]" = qkv_2.permute(2, 0, 3, 1, 4);  qkv_2 = None
        q_2: "f32[1, 6, 2048, 16]" = permute_2[0]
        k_2: "f32[1, 6, 2048, 16]" = permute_2[1]
        v_2: "f32[1, 6, 2048, 16]" = permute_2[2];  permute_2 = None

        # File: /work/main/examples/gpt_example.py:45 in forward, code: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y_2: "f32[1, 6, 2048, 16]" = torch._C._nn.scaled_dot_product_attention(q_2, k_2, v_2, is_causal = True);  q_2 = k_2 = v_2 = None

        # File: /work/main/examples/gpt_example.py:48 in forward, code: return self.proj(y.transpose(1, 2).reshape(B, T, C))
        transpose_2: "f32[1, 2048, 6, 16]" = y_2.transpose(1, 2);  y_2 = None
        reshape_2: "f32[1, 2048, 96]" = transpose_2.reshape(1, 2048, 96);  transpose_2 = None
        linear_9: "f32[1, 2048, 96]" = torch._C._nn.linear(reshape_2, l_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_weight_, l_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_bias_);  reshape_2 = l_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_weight_ = l_self_modules_blocks_modules_2_modules_attn_modules_proj_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        x_5: "f32[1, 2048, 96]" = x_4 + linear_9;  x_4 = linear_9 = None

        # File: /work/main/examples/gpt_example.py:63 in forward, code: return x + self.mlp(self.ln_2(x))
        layer_norm_5: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_5, (96,), l_self_modules_blocks_modules_2_modules_ln_2_parameters_weight_, l_self_modules_blocks_modules_2_modules_ln_2_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_2_modules_ln_2_parameters_weight_ = l_self_modules_blocks_modules_2_modules_ln_2_parameters_bias_ = None
        input_7: "f32[1, 2048, 384]" = torch._C._nn.linear(layer_norm_5, l_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_weight_, l_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_bias_);  layer_norm_5 = l_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_weight_ = l_self_modules_blocks_modules_2_modules_mlp_modules_0_parameters_bias_ = None
        input_8: "f32[1, 2048, 384]" = torch._C._nn.gelu(input_7, approximate = 'none');  input_7 = None
        input_9: "f32[1, 2048, 96]" = torch._C._nn.linear(input_8, l_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_weight_, l_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_bias_);  input_8 = l_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_weight_ = l_self_modules_blocks_modules_2_modules_mlp_modules_2_parameters_bias_ = None
        x_6: "f32[1, 2048, 96]" = x_5 + input_9;  x_5 = input_9 = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        layer_norm_6: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_6, (96,), l_self_modules_blocks_modules_3_modules_ln_1_parameters_weight_, l_self_modules_blocks_modules_3_modules_ln_1_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_3_modules_ln_1_parameters_weight_ = l_self_modules_blocks_modules_3_modules_ln_1_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:42 in forward, code: qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        linear_12: "f32[1, 2048, 288]" = torch._C._nn.linear(layer_norm_6, l_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_weight_, l_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_bias_);  layer_norm_6 = l_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_weight_ = l_self_modules_blocks_modules_3_modules_attn_modules_qkv_parameters_bias_ = None
        qkv_3: "f32[1, 2048, 3, 6, 16]" = linear_12.view(1, 2048, 3, 6, 16);  linear_12 = None

        # File: /work/main/examples/gpt_example.py:43 in forward, code: q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        permute_3: "f32[3, 1, 6, 2048, 16]" = qkv_3.permute(2, 0, 3, 1, 4);  qkv_3 = None
        q_3: "f32[1, 6, 2048, 16]" = permute_3[0]
        k_3: "f32[1, 6, 2048, 16]" = permute_3[1]
        v_3: "f32[1, 6, 2048, 16]" = permute_3[2];  permute_3 = None

        # File: /work/main/examples/gpt_example.py:45 in forward, code: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y_3: "f32[1, 6, 2048, 16]" = torch._C._nn.scaled_dot_product_attention(q_3, k_3, v_3, is_causal = True);  q_3 = k_3 = v_3 = None

        # File: /work/main/examples/gpt_example.py:48 in forward, code: return self.proj(y.transpose(1, 2).reshape(B, T, C))
        transpose_3: "f32[1, 2048, 6, 16]" = y_3.transpose(1, 2);  y_3 = None
        reshape_3: "f32[1, 2048, 96]" = transpose_3.reshape(1, 2048, 96);  transpose_3 = None
        linear_13: "f32[1, 2048, 96]" = torch._C._nn.linear(reshape_3, l_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_weight_, l_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_bias_);  reshape_3 = l_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_weight_ = l_self_modules_blocks_modules_3_modules_attn_modules_proj_parameters_bias_ = None

        # File: /work/main/examples/gpt_example.py:62 in forward, code: x = x + self.attn(self.ln_1(x))
        x_7: "f32[1, 2048, 96]" = x_6 + linear_13;  x_6 = linear_13 = None

        # File: /work/main/examples/gpt_example.py:63 in forward, code: return x + self.mlp(self.ln_2(x))
        layer_norm_7: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_7, (96,), l_self_modules_blocks_modules_3_modules_ln_2_parameters_weight_, l_self_modules_blocks_modules_3_modules_ln_2_parameters_bias_, 1e-05);  l_self_modules_blocks_modules_3_modules_ln_2_parameters_weight_ = l_self_modules_blocks_modules_3_modules_ln_2_parameters_bias_ = None
        input_10: "f32[1, 2048, 384]" = torch._C._nn.linear(layer_norm_7, l_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_weight_, l_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_bias_);  layer_norm_7 = l_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_weight_ = l_self_modules_blocks_modules_3_modules_mlp_modules_0_parameters_bias_ = None
        input_11: "f32[1, 2048, 384]" = torch._C._nn.gelu(input_10, approximate = 'none');  input_10 = None
        input_12: "f32[1, 2048, 96]" = torch._C._nn.linear(input_11, l_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_weight_, l_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_bias_);  input_11 = l_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_weight_ = l_self_modules_blocks_modules_3_modules_mlp_modules_2_parameters_bias_ = None
        x_8: "f32[1, 2048, 96]" = x_7 + input_12;  x_7 = input_12 = None

        # File: /work/main/examples/gpt_example.py:82 in forward, code: return self.lm_head(self.ln_f(x))
        layer_norm_8: "f32[1, 2048, 96]" = torch.nn.functional.layer_norm(x_8, (96,), l_self_modules_ln_f_parameters_weight_, l_self_modules_ln_f_parameters_bias_, 1e-05);  x_8 = l_self_modules_ln_f_parameters_weight_ = l_self_modules_ln_f_parameters_bias_ = None
        linear_16: "f32[1, 2048, 256]" = torch._C._nn.linear(layer_norm_8, l_self_modules_lm_head_parameters_weight_, None);  layer_norm_8 = l_self_modules_lm_head_parameters_weight_ = None
        return (linear_16,)
