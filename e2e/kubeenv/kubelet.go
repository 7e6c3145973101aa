package main

import (
	"context"
	"fmt"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// PodIPAnnotation names the address of the real process that plays a pod.
const PodIPAnnotation = "e2e.meshpilot.dev/pod-ip"

// runKubelet plays scheduler and kubelet for one Node, the way KWOK does:
// it binds every unscheduled Pod to its Node and reports bound Pods Running
// and Ready, with status.podIP from the pod-ip annotation.
func runKubelet(args []string) error {
	fs := pflag.NewFlagSet("kubelet", pflag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	node := fs.String("node", "", "node name")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cs, err := clientFor(*kubeconfig)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := registerNode(ctx, cs, *node); err != nil {
		return fmt.Errorf("registering node: %w", err)
	}
	factory := informers.NewSharedInformerFactory(cs, 0)
	pods := factory.Core().V1().Pods().Informer()
	queue := make(chan *corev1.Pod, 1024)
	enqueue := func(obj interface{}) {
		if p, ok := obj.(*corev1.Pod); ok {
			queue <- p
		}
	}
	_, _ = pods.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: enqueue, UpdateFunc: func(_, n interface{}) { enqueue(n) }})
	factory.Start(ctx.Done())
	for {
		select {
		case <-ctx.Done():
			return nil
		case p := <-queue:
			err := reconcilePod(ctx, cs, *node, p)
			if err == nil || apierrors.IsNotFound(err) {
				continue
			}
			if !apierrors.IsConflict(err) {
				fmt.Printf("pod %s/%s: %v\n", p.Namespace, p.Name, err)
			}
			// Retry soon with the pod as it is now (a conflict means our copy was stale),
			// so a pod is Ready within milliseconds, as with a real kubelet's status sync.
			go func(ns, name string) {
				time.Sleep(50 * time.Millisecond)
				if fresh, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
					queue <- fresh
				}
			}(p.Namespace, p.Name)
		}
	}
}

func registerNode(ctx context.Context, cs *kubernetes.Clientset, name string) error {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname": name, "topology.kubernetes.io/region": "region-1", "topology.kubernetes.io/zone": "zone-a",
		}},
	}
	created, err := cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return err
	}
	created.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), Reason: "KubeletReady"}}
	created.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}}
	_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	return err
}

func reconcilePod(ctx context.Context, cs *kubernetes.Clientset, node string, p *corev1.Pod) error {
	if p.DeletionTimestamp != nil {
		// No containers to stop: let the deletion finish at once.
		zero := int64(0)
		return cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	if p.Spec.NodeName == "" {
		return cs.CoreV1().Pods(p.Namespace).Bind(ctx, &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: node},
		}, metav1.CreateOptions{})
	}
	if p.Spec.NodeName != node {
		return nil
	}
	ip := p.Annotations[PodIPAnnotation]
	ready := corev1.ConditionTrue
	if ip == "" || p.Annotations["e2e.meshpilot.dev/ready"] == "false" {
		ready = corev1.ConditionFalse
	}
	if p.Status.Phase == corev1.PodRunning && p.Status.PodIP == ip && podCondition(p, corev1.PodReady) == ready {
		return nil
	}
	now := metav1.Now()
	p = p.DeepCopy()
	p.Status.Phase = corev1.PodRunning
	p.Status.HostIP = "127.0.0.1"
	p.Status.PodIP = ip
	p.Status.PodIPs = nil
	if ip != "" {
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	}
	p.Status.StartTime = &now
	p.Status.Conditions = []corev1.PodCondition{
		{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.ContainersReady, Status: ready, LastTransitionTime: now},
		{Type: corev1.PodReady, Status: ready, LastTransitionTime: now},
	}
	p.Status.ContainerStatuses = nil
	for _, c := range p.Spec.Containers {
		p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, Ready: ready == corev1.ConditionTrue, Started: boolPtr(true),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	_, err := cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	return err
}

func podCondition(p *corev1.Pod, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range p.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return corev1.ConditionUnknown
}

func boolPtr(b bool) *bool { return &b }
