package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// PKI holds the paths of a cluster's certificates and keys.
type PKI struct {
	CACert, CAKey, ServerCert, ServerKey, AdminCert, AdminKey, SAKey, SAPub string
}

func pkiPaths(dir string) *PKI {
	p := filepath.Join(dir, "pki")
	return &PKI{
		CACert: filepath.Join(p, "ca.crt"), CAKey: filepath.Join(p, "ca.key"),
		ServerCert: filepath.Join(p, "apiserver.crt"), ServerKey: filepath.Join(p, "apiserver.key"),
		AdminCert: filepath.Join(p, "admin.crt"), AdminKey: filepath.Join(p, "admin.key"),
		SAKey: filepath.Join(p, "sa.key"), SAPub: filepath.Join(p, "sa.pub"),
	}
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

func newKey() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) }

// ensurePKI creates the CA, the serving certificate, an admin client
// certificate (system:masters) and the service-account key pair, once.
func ensurePKI(dir string) (*PKI, error) {
	p := pkiPaths(dir)
	if _, err := os.Stat(p.SAPub); err == nil {
		return p, nil
	}
	if err := os.MkdirAll(filepath.Dir(p.CACert), 0o755); err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour)
	caKey, err := newKey()
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubeenv-ca"},
		NotBefore: now, NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, IsCA: true, BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, orgs []string, usage x509.ExtKeyUsage, ips []net.IP, dns []string, certPath, keyPath string) error {
		key, err := newKey()
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: orgs},
			NotBefore: now, NotAfter: now.Add(10 * 365 * 24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: ips, DNSNames: dns,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(certPath, "CERTIFICATE", der); err != nil {
			return err
		}
		return writePEM(keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
	}
	if err := writePEM(p.CACert, "CERTIFICATE", caDER); err != nil {
		return nil, err
	}
	if err := writePEM(p.CAKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(caKey)); err != nil {
		return nil, err
	}
	if err := issue(2, "kube-apiserver", nil, x509.ExtKeyUsageServerAuth,
		[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")},
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, p.ServerCert, p.ServerKey); err != nil {
		return nil, err
	}
	if err := issue(3, "kubeenv-admin", []string{"system:masters"}, x509.ExtKeyUsageClientAuth, nil, nil, p.AdminCert, p.AdminKey); err != nil {
		return nil, err
	}
	saKey, err := newKey()
	if err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(p.SAKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey)); err != nil {
		return nil, err
	}
	if err := writePEM(p.SAPub, "PUBLIC KEY", pub); err != nil {
		return nil, err
	}
	return p, nil
}

func b64File(path string) (string, error) {
	b, err := os.ReadFile(path)
	return base64.StdEncoding.EncodeToString(b), err
}

// writeKubeconfig writes an admin kubeconfig with context NAME-context.
func writeKubeconfig(path, name string, port int, p *PKI) error {
	ca, err := b64File(p.CACert)
	if err != nil {
		return err
	}
	cert, err := b64File(p.AdminCert)
	if err != nil {
		return err
	}
	key, err := b64File(p.AdminKey)
	if err != nil {
		return err
	}
	text := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: %[1]s
  cluster:
    server: https://127.0.0.1:%[2]d
    certificate-authority-data: %[3]s
users:
- name: %[1]s-admin
  user:
    client-certificate-data: %[4]s
    client-key-data: %[5]s
contexts:
- name: %[1]s-context
  context:
    cluster: %[1]s
    user: %[1]s-admin
current-context: %[1]s-context
`, name, port, ca, cert, key)
	return os.WriteFile(path, []byte(text), 0o600)
}
